"""Test support: the float64 NumPy oracle and synthetic TFDS datasets."""
