"""The content-addressed stage cache."""
