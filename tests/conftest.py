"""Suite-wide setup.

`import kvgrove` first: it swaps MLX's reference BLAS for OpenBLAS, which only works before
anything imports mlx (see kvgrove.blas). Servers started by tests keep their prefix cache's disk
tier in a folder of this session, never in the user's cache.
"""

import os
import tempfile

import kvgrove  # noqa: F401

os.environ.setdefault("KVGROVE_KV_DIR", tempfile.mkdtemp(prefix="kvgrove-test-kv-"))
