"""CUDA C++ Jinja templates (package data): one kernel family per *.cu.j2 file, shared device code in include/."""
