"""Load a model by short name or path: a GGUF file, a Hugging Face/MLX folder, or the default.

Architectures, weight sanitizing and quantized layers come from mlx-lm unchanged. kvgrove adds the
GGUF route (kvgrove.models.gguf), its own tokenizer (kvgrove.tokenize), and a dtype policy: on a
CPU, quantized matmul is ~60x slower at prefill than float32 with OpenBLAS, so models are
dequantized to float32 there when they fit; on a GPU they stay quantized.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model, infer_quant_config
from mlx_lm.utils import load_model as mlx_lm_load_model

from kvgrove.models import bundled
from kvgrove.models.gguf import apply_rope_factors, gguf_summary, read_gguf
from kvgrove.models.quant import add_dense_copies, compile_batched_kernels, dense_rows

log = logging.getLogger(__name__)

_CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "n_ctx")
DEFAULT_CONTEXT_TOKENS = 4096


@attrs.frozen
class ModelInfo:
    """What loading reports about a model (and what /api/show and /api/ps serve)."""

    name: str
    path: str
    architecture: str
    context_length: int
    dtype: str
    nbytes: int
    parameters: int
    quantization: str | None  # e.g. "Q4 (group 32)" when kept quantized
    source_format: str  # "gguf" | "hf"
    num_layers: int
    fingerprint: str  # identifies weights + dtype: keys the on-disk KV cache
    load_seconds: float
    # GGUF only: tensor type -> "N tensors: what loading did with them" (kvgrove show).
    tensor_types: dict[str, str] = attrs.field(factory=dict)
    origin: str = "path"  # "path" | "bundled" | "ollama" | "huggingface"
    # From an Ollama manifest: default options (Ollama's names) and its Go template text.
    params: dict[str, Any] = attrs.field(factory=dict)
    template: str | None = None
    # Tensor parallel: how this rank's shard splits the model ("" = not split).
    tensor_parallel: str = ""


@attrs.define
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # kvgrove.tokenize.Tokenizer
    config: dict[str, Any]
    info: ModelInfo


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


@attrs.frozen
class Source:
    """Where a model name led: its display name, its file or folder, and for a model from
    Ollama's store the manifest's default options and template."""

    name: str
    path: Path
    params: dict[str, Any] = attrs.field(factory=dict)
    template: str | None = None
    origin: str = "path"  # "path" | "bundled" | "ollama" | "huggingface"


def find(name: str | os.PathLike | None, *, paths: bool = True) -> Source:
    """A name -> its source: a path, a bundled short name (pulled if needed), a model in
    Ollama's store (`llama3.2:3b`, `hf.co/org/repo:Q4_K_M`), or a repo in the local Hugging
    Face cache (`org/repo`). Never touches the network except to pull a bundled model.
    paths=False: names only (what an HTTP request may ask for), never a file or folder."""
    from kvgrove.models import hf_hub, ollama_store

    if name is None or str(name) == "":
        spec = bundled.DEFAULT
        return Source(spec.name, bundled.pull(spec), origin="bundled")
    path = Path(name).expanduser()
    if paths and path.exists():
        return Source(path.stem if path.is_file() else path.name, path)
    text = str(name)
    spec = bundled.lookup(text.removesuffix(":latest"))
    if spec is not None:
        return Source(spec.name, bundled.pull(spec), origin="bundled")
    stored = ollama_store.lookup(text)
    if stored is not None:
        return Source(stored.name, stored.gguf, stored.params, stored.template, "ollama")
    cached = hf_hub.lookup(text)
    if cached is not None:
        return Source(text, cached, origin="huggingface")
    known = ", ".join(sorted(bundled.BUNDLED))
    raise FileNotFoundError(
        f"model {text!r} not found: give a GGUF file, a model folder, one of: {known}, a model "
        f"in Ollama's store ({ollama_store.store_root()}), or a Hugging Face repo in the local "
        "cache (`kvgrove pull org/repo` downloads one)"
    )


def resolve(name: str | os.PathLike | None) -> tuple[str, Path]:
    """A short name or path -> (display name, path). Pulls the bundled default if needed."""
    source = find(name)
    return source.name, source.path


def is_gguf(path: Path) -> bool:
    """A .gguf file, or a file starting with GGUF's magic (Ollama's blobs have no suffix)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _fingerprint(path: Path, dtype: str) -> str:
    files = (
        [path] if path.is_file() else [*sorted(path.glob("*.safetensors")), path / "config.json"]
    )
    # ":f32-dequant": quantized weights are dequantized in float32 since this version, so KV
    # cached on disk by earlier versions (float16-rounded weights) is not served to it.
    h = hashlib.sha256(f"{dtype}:f32-dequant".encode())
    for f in files:
        if f.exists():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _context_length(config: dict[str, Any]) -> int:
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return source[key]
    return DEFAULT_CONTEXT_TOKENS


def _build_gguf(
    path: Path, requantize: bool, progress: Any = None
) -> tuple[nn.Module, dict[str, Any], Any]:
    read = read_gguf(path, requantize=requantize, progress=progress)
    weights, config = read.weights, read.config
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    apply_rope_factors(model, config)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)

    def quantized_here(p: str, m: nn.Module) -> bool | dict:
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        return infer_quant_config(p, m, weights)

    nn.quantize(model, class_predicate=quantized_here)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    return model, config, read


def _is_quantized(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) or "scales" in m
        for _, m in model.named_modules()
    )


def _quantization_label(model: nn.Module) -> str | None:
    seen = {
        (m.bits, m.group_size)
        for _, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size")
    }
    if not seen:
        return None
    return ", ".join(f"Q{b} (group {g})" for b, g in sorted(seen))


def _nbytes(model: nn.Module) -> tuple[int, int]:
    params = tree_flatten(model.parameters())
    return sum(v.nbytes for _, v in params), sum(v.size for _, v in params)


def _float_dtype(model: nn.Module) -> mx.Dtype:
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def _float32_fits(weights: int, fraction: float = 0.25) -> bool:
    """Would `weights` float32 values take under `fraction` of physical memory?"""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return False
    return weights * 4 < total * fraction


def _dequantized_fits(model: nn.Module, fraction: float = 0.25) -> bool:
    """Would float32 weights take under `fraction` of physical memory?"""
    _, count = _nbytes(model)
    # Packed uint32 counts 32/bits weights per element; assume 4 bits, the worst case.
    return _float32_fits(count * 8, fraction)


def load(
    name: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    dequantize: bool | None = None,
    progress: Callable[[float], None] | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer.

    dtype: "float32", "float16" or "bfloat16" for the unquantized weights (default: float32 on
    CPU, the checkpoint's own dtype on GPU). dequantize: None = the policy above. progress:
    called (on the loading thread) with the fraction done as reading advances.
    """
    from kvgrove.tokenize import load_tokenizer, tokenizer_from_gguf

    start = time.perf_counter()
    found = find(name)
    display, path = found.name, found.path
    tensor_types: dict[str, str] = {}
    if is_gguf(path):
        if dequantize is None:
            _, elements = gguf_summary(path)
            requantize = on_gpu() or not _float32_fits(elements)
        else:
            requantize = not dequantize
        model, config, read = _build_gguf(path, requantize, progress)
        tokenizer = tokenizer_from_gguf(read.metadata)
        tensor_types = dict(read.tensor_types)
        source = "gguf"
    elif path.is_dir() and (path / "config.json").exists():
        model, config = mlx_lm_load_model(path)
        tokenizer = load_tokenizer(path)
        source = "hf"
    else:
        raise ValueError(f"{path} is neither a .gguf file nor a model folder with config.json")

    quantized = _is_quantized(model)
    if dequantize is None:
        dequantize = quantized and not on_gpu() and _dequantized_fits(model)
    if quantized and dequantize:
        if dtype in (None, "float32") and not on_gpu():
            # Dequantize in float32: float16 scales times 4/8-bit codes round in float16.
            model.set_dtype(mx.float32)
        model = dequantize_model(model)
        quantized = False
    if dtype is None and not on_gpu():
        dtype = "float32"
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    if progress is not None:
        progress(1.0)
    final = _quantization_label(model) if quantized else None
    tail = f"; model kept {final}" if final else f"; model in {_float_dtype(model)}"
    tensor_types = {
        kind: what + tail.replace("mlx.core.", "") for kind, what in tensor_types.items()
    }

    nbytes, count = _nbytes(model)
    if quantized and on_gpu():  # batched steps take a dense copy where it fits (models.quant)
        # Tied: the embedding is the head (mlx-lm's models then have no lm_head).
        tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False) or not any(
            name.endswith("lm_head") for name, _ in model.named_modules()
        )
        added = add_dense_copies(model, rows=dense_rows(), weights_bytes=nbytes, tied=tied)
        nbytes += added
        if not added or dense_rows() > 8:  # the quantized kernel still meets >= 8 rows
            compile_batched_kernels(model)
    dtype_name = str(_float_dtype(model)).removeprefix("mlx.core.")
    info = ModelInfo(
        name=display,
        path=str(path),
        architecture=config.get("model_type", "unknown"),
        context_length=_context_length(config),
        dtype=dtype_name,
        nbytes=nbytes,
        parameters=count,
        quantization=_quantization_label(model) if quantized else None,
        source_format=source,
        num_layers=len(getattr(model, "layers", [])),
        fingerprint=_fingerprint(path, dtype_name),
        load_seconds=time.perf_counter() - start,
        tensor_types=tensor_types,
        origin=found.origin,
        params=dict(found.params),
        template=found.template,
    )
    log.info(
        "loaded %s (%s, %s%s): %d layers, context %d tokens, %.1f MiB in %.2fs",
        info.name,
        info.architecture,
        info.dtype,
        f", {info.quantization}" if info.quantization else "",
        info.num_layers,
        info.context_length,
        info.nbytes / 2**20,
        info.load_seconds,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, info=info)


def describe(info: ModelInfo) -> str:
    return json.dumps(attrs.asdict(info), indent=2)
