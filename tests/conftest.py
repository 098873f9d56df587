"""Suite-wide setup. `import kvgrove` first: it swaps MLX's reference BLAS for OpenBLAS, which
only works before anything imports mlx (see kvgrove.blas)."""

import kvgrove  # noqa: F401
