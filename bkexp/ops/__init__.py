"""Kernels (BK-Core, selective scan), each fast path with a pure-PyTorch reference beside it."""
