"""Split a loaded model across the ranks of a group.

Two layouts, chosen per model (`layout`):

- "heads": mlx-lm's own `shard()` (llama, qwen2/3, qwen3_5, glm4_moe, deepseek_v2/v3,
  gpt_oss, ...): attention heads and MLP columns split across ranks, the output projections
  all-reduce (`sharded-to-all`), so every rank computes the same full logits. Each rank's KV
  cache holds its own heads.
- "mlp": where the attention heads (or KV heads) do not divide by the ranks but every layer's
  MLP (`gate_proj`/`up_proj`/`down_proj`) does, only the MLP is split (the same
  all-to-sharded / sharded-to-all pair mlx-lm uses) and attention is replicated: every rank
  computes all heads and holds the whole KV cache. One all-reduce per layer instead of two;
  less memory saved (attention and KV are not split). The bundled SmolLM2-135M (9 heads, 3 KV
  heads, MLP width 1536) runs on 2 ranks this way.

Any other model gets a clear error naming why.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

_HEAD_FIELDS = ("n_heads", "n_kv_heads", "num_attention_heads", "num_key_value_heads")
_MLP = ("gate_proj", "up_proj", "down_proj")


class ShardError(ValueError):
    """The model cannot be split across this many ranks."""


def _heads_problem(model: Any, size: int) -> str | None:
    for i, layer in enumerate(getattr(model, "layers", [])):
        attn = getattr(layer, "self_attn", None)
        for name in _HEAD_FIELDS:
            n = getattr(attn, name, None)
            if isinstance(n, int) and n % size:
                return f"layer {i} has {name}={n}, which does not divide by {size}"
    return None


def _mlp_problem(model: Any, size: int) -> str | None:
    layers = list(getattr(model, "layers", []))
    if not layers:
        return "the model has no layers to split"
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        projections = [getattr(mlp, name, None) for name in _MLP]
        if not all(isinstance(p, nn.Linear | nn.QuantizedLinear) for p in projections):
            return f"layer {i} has no dense gate/up/down MLP to split"
        width = projections[0].weight.shape[0]  # gate_proj: (intermediate, hidden)
        if width % size:
            return f"layer {i}'s MLP width {width} does not divide by {size}"
    return None


def layout(model: Any, size: int, architecture: str | None = None) -> str:
    """How `model` splits over `size` ranks: "heads", "mlp" (attention replicated), or
    ShardError naming why neither fits."""
    if size == 1:
        return "whole"
    if not callable(getattr(model, "shard", None)):
        arch = architecture or getattr(getattr(model, "args", None), "model_type", "?")
        raise ShardError(
            f"tensor parallel: mlx-lm's {arch!r} model has no shard() method, so it cannot be "
            "split across ranks (mlx-lm shards llama, qwen2, qwen3, qwen3_5, glm4_moe, "
            "deepseek_v2/v3, gpt_oss and others)"
        )
    heads = _heads_problem(model, size)
    if heads is None:
        return "heads"
    mlp = _mlp_problem(model, size)
    if mlp is None:
        return "mlp"
    raise ShardError(
        f"tensor parallel over {size} ranks: {heads}, and the MLP cannot be split alone: {mlp}"
    )


def describe_layout(kind: str, size: int) -> str:
    """One line for logs, `kvgrove show` and /api/show."""
    if kind == "heads":
        return f"{size} ranks: attention heads and MLP split (each rank holds its heads' KV)"
    if kind == "mlp":
        return (
            f"{size} ranks: MLP split, attention replicated (the heads do not divide by {size};"
            " every rank holds the whole KV)"
        )
    return "1 rank"


def _shard_mlp(model: Any, group: Any) -> None:
    from mlx.nn.layers.distributed import shard_linear

    for layer in model.layers:
        mlp = layer.mlp
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def shard_loaded(loaded: Any, group: Any) -> Any:
    """The `LoadedModel` with its model sharded in place for `group`'s rank (unchanged for a
    group of one). Its info reports this rank's bytes, the layout, and a fingerprint naming the
    shard, so KV a rank writes is never read as another rank's or an unsharded model's."""
    from kvgrove.models.loading import _nbytes

    size, rank = group.size(), group.rank()
    if size == 1:
        return loaded
    model = loaded.model
    kind = layout(model, size, loaded.info.architecture)
    if kind == "heads":
        model.shard(group)
    else:
        _shard_mlp(model, group)
    mx.eval(model.parameters())
    described = describe_layout(kind, size)
    log.info("tensor parallel: %s", described)
    info = attrs.evolve(  # the parameter count stays the whole model's
        loaded.info,
        nbytes=_nbytes(model)[0],
        fingerprint=f"{loaded.info.fingerprint}+tp{rank}of{size}",
        tensor_parallel=described,
    )
    return attrs.evolve(loaded, info=info)
