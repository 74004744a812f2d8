"""Triton kernels and their launchers (installed as ``mesimp_gpu.kernels``). No autograd here."""
