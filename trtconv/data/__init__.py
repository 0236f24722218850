"""Text data: packs, token rows, and the small trained reference models."""
