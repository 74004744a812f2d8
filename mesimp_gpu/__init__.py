"""mesimp-gpu: sparsified back propagation (meProp) and model simplification (meSimp)."""

from mesimp_gpu.convert import LinearChains, convert, mesimp_chains
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode

__version__ = "0.1.0"

__all__ = ["LinearChains", "MePropConfig", "MePropLinear", "MePropMode", "__version__", "convert", "mesimp_chains"]
