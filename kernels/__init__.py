"""Triton kernels, one module per op (installed as the subpackage structprune.kernels)."""
