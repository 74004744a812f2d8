"""mesimp-gpu: sparsified back propagation (meProp) and model simplification (meSimp)."""

from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode

__version__ = "0.1.0"

__all__ = ["MePropConfig", "MePropLinear", "MePropMode", "__version__"]
