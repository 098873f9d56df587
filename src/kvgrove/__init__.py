"""kvgrove: an LLM inference server on MLX for many conversations at once."""

__version__ = "0.1.0"
