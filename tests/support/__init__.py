"""Test support: the float64 NumPy oracle, synthetic TFDS datasets, compiled init."""
