"""kvgrove: an LLM inference server on MLX for many conversations at once."""

from kvgrove import blas as _blas

# Must happen before anything imports mlx (see kvgrove.blas).
_blas.preload()

__version__ = "0.1.0"
