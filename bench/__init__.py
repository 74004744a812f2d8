"""Benchmarks (installed as ``mesimp_gpu.bench``); committed results live in ``bench/results/``."""
