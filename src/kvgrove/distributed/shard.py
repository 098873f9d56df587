"""Split a loaded model across the ranks of a group with mlx-lm's own `shard()`.

mlx-lm gives tensor-parallel sharding to the architectures whose model class has a `shard`
method (llama, qwen2/3, qwen3_5, glm4_moe, deepseek_v2/v3, gpt_oss, ...): attention heads and
MLP columns split across ranks, the output projections all-reduce (`sharded-to-all`), so every
rank computes the same full logits. Any other architecture gets a clear error naming it.
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx


class ShardError(ValueError):
    """The model cannot be split across this many ranks."""


def _check_heads(model: Any, size: int) -> None:
    for i, layer in enumerate(getattr(model, "layers", [])):
        attn = getattr(layer, "self_attn", None)
        for name in ("n_heads", "n_kv_heads", "num_attention_heads", "num_key_value_heads"):
            n = getattr(attn, name, None)
            if isinstance(n, int) and n % size:
                raise ShardError(
                    f"tensor parallel over {size} ranks: layer {i} has {name}={n}, "
                    f"which does not divide by {size}"
                )


def shard_loaded(loaded: Any, group: Any) -> Any:
    """The `LoadedModel` with its model sharded in place for `group`'s rank (unchanged for a
    group of one). Its info reports this rank's bytes and a fingerprint naming the shard, so
    KV a rank writes is never read as another rank's or an unsharded model's."""
    from kvgrove.models.loading import _nbytes

    size, rank = group.size(), group.rank()
    if size == 1:
        return loaded
    model, arch = loaded.model, loaded.info.architecture
    if not callable(getattr(model, "shard", None)):
        raise ShardError(
            f"tensor parallel: mlx-lm's {arch!r} model has no shard() method, so it cannot be "
            "split across ranks (mlx-lm shards llama, qwen2, qwen3, qwen3_5, glm4_moe, "
            "deepseek_v2/v3, gpt_oss and others)"
        )
    _check_heads(model, size)
    model.shard(group)
    mx.eval(model.parameters())
    info = attrs.evolve(  # the parameter count stays the whole model's
        loaded.info,
        nbytes=_nbytes(model)[0],
        fingerprint=f"{loaded.info.fingerprint}+tp{rank}of{size}",
    )
    return attrs.evolve(loaded, info=info)
