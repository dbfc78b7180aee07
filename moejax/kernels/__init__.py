"""Grouped-matmul kernels behind one function, with per-platform implementations."""
