"""Which prompts the runner stores as they prefill (`StepRunner.share_min_tokens`): only those
that compute at least that many tokens, prefilled together or alone; every sequence is still
stored when it is released."""

from __future__ import annotations

from kvgrove.actors.messages import Step
from kvgrove.config import Settings
from kvgrove.models.loading import load
from kvgrove.models.runner import StepRunner
from kvgrove.models.steps import Start, StepItem
from kvgrove.sampling import SamplingParams
from tiny_models import write_tiny_model

PROMPTS = {1: tuple(range(5, 17)), 2: tuple(range(40, 70))}  # 12 and 30 tokens


def test_only_prompts_computing_share_min_tokens_are_stored_as_they_prefill(tmp_path):
    loaded = load(str(write_tiny_model(tmp_path / "m", "llama")))
    for together in (True, False):
        runner = StepRunner(chunk_tokens=64, batch_prefill=together, overlap=False)
        runner.use_model(loaded.model, loaded.tokenizer)
        runner.keeping, runner.share_min_tokens = True, 20
        params = SamplingParams(temperature=0)
        items = tuple(
            StepItem(rid, p, True, start=Start(params, p, 400)) for rid, p in PROMPTS.items()
        )
        result = runner.run(Step(items, (), None))
        assert result.error is None and all(r.error is None for r in result.results)
        assert (runner.batch_rows == 2) is together  # prefilled together: rows of the batch
        assert [k.tokens for k in runner.take_keeps()] == [PROMPTS[2]], together
        # Released, both are stored: what their caches hold, their prompts (the token each
        # sampled was never fed).
        runner.run(Step((), (1, 2), None))
        assert {k.request_id: k.tokens for k in runner.take_keeps()} == PROMPTS, together


def test_the_auto_values_depend_on_the_device():
    auto = Settings()
    assert auto.prefill_step_tokens_for(gpu=True) == 4 * auto.prefill_chunk_tokens
    assert auto.prefill_step_tokens_for(gpu=False) == auto.prefill_chunk_tokens
    assert auto.share_prefill_min_tokens_for(gpu=True) == 64
    assert auto.share_prefill_min_tokens_for(gpu=False) == 0
    told = Settings(prefill_step_tokens=100, share_prefill_min_tokens=0)
    assert told.prefill_step_tokens_for(gpu=True) == 100
    assert told.share_prefill_min_tokens_for(gpu=True) == 0
