"""Helpers for tests, scripts and benchmarks (no kernels): `multiproc` runs a function on N ranks."""
