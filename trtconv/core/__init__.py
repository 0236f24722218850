"""Errors, terminal/CI output, and the environment (device, versions)."""
