"""Benchmarks of rosa_kernels against the alternatives a user has (see docs/benchmarks.md)."""
