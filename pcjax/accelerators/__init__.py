"""Compile-only accelerator targets (`--compile_for`): TPU slices and GPUs by name, the
trainer's steps compiled for them, and the report."""
