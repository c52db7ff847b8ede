"""Reading datasets from disk (and downloading them on a connected machine)."""
