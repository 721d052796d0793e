"""Parallelism and its companions, applied to a built model by free functions (see compile.py)."""
