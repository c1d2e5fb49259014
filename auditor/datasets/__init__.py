"""Data sets: the loaders that stream samples in batches (IDX, arrays, image folders)."""
