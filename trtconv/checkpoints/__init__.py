"""The on-disk checkpoint formats and the PyTorch executors that read them back."""
