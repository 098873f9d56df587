"""Tensor parallel over `mx.distributed`: rank 0 plans, every rank executes the same step.

- `codec`: a `Step` as int32 words and the fixed-size frames they travel in (sync, pure).
- `broadcast`: the frames from rank 0 to every rank through an `all_sum` collective.
- `shard`: mlx-lm's own `shard()` on a loaded model, with a clear error where there is none.
- `executor`: rank 0's executor (broadcasts each step before running it) and the followers'
  loop (receives steps and runs them with the same executor code).
"""
