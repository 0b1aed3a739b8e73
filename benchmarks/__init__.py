"""Benchmarks of pcjax's own code. Run each from the repository root as `python -m
benchmarks.<script>`; their tables, with the command that produced each, are in docs/benchmarks/.
"""
