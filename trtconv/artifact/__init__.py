"""The artifact folder: atomic writer, manifest, report."""
