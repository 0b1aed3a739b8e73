"""Datasets and input: dataset specs, the digits data, TensorFlow preprocessing and the
TFDS pipelines with their samplers."""
