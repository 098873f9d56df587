"""The runner's run-ahead with sampling in the forward's graph, driven step by step: a plan
that takes only some rows, or none, gives the seeded rows' draws back, so every row draws the
tokens it draws with the overlap off (in the threaded engine this depends on timing; here
each path is taken for certain)."""

from __future__ import annotations

from kvgrove.actors.messages import Step
from kvgrove.models.loading import load
from kvgrove.models.runner import StepRunner
from kvgrove.models.steps import Start, StepItem
from kvgrove.sampling import SamplingParams
from tiny_models import write_tiny_model


def run(folder: str, overlap: bool) -> tuple[dict[int, list[int]], StepRunner]:
    loaded = load(folder)
    runner = StepRunner(chunk_tokens=64, batch_prefill=True, overlap=overlap)
    runner.use_model(loaded.model, loaded.tokenizer)
    params = {
        1: SamplingParams(temperature=0.9, seed=5),
        2: SamplingParams(temperature=1.1, top_k=30, seed=9, logprobs=True, top_logprobs=1),
    }
    prompts = {1: tuple(range(5, 17)), 2: tuple(range(40, 49))}
    out: dict[int, list[int]] = {1: [], 2: []}

    def step(rids, *, first=False, ahead=True):
        items = tuple(
            StepItem(
                rid,
                prompts[rid] if first else (out[rid][-1],),
                True,
                start=Start(params[rid], prompts[rid], 400) if first else None,
            )
            for rid in rids
        )
        result = runner.run(Step(items, (), None, ahead=ahead))
        assert result.error is None, result.error
        for r in result.results:
            assert r.error is None, r.error
            out[r.request_id].append(r.token)

    step((1, 2), first=True)  # prefilled together; the next decode of both runs ahead
    step((1, 2))  # taken whole: sampled in the forward's graph
    step((1, 2))
    step((1,))  # only row 1: 2 leaves, both rows' draws given back, row 1 sampled again
    step((1,))
    step((1, 2), ahead=False)  # 2 joins again: the step run ahead is undone
    step((1, 2))
    step((1, 2), ahead=False)
    step((2,))  # nothing ran ahead of this one
    return out, runner


def test_samples_built_ahead_and_not_taken_give_their_draws_back(tmp_path):
    folder = str(write_tiny_model(tmp_path / "m", "llama"))
    off, off_runner = run(folder, overlap=False)
    on, on_runner = run(folder, overlap=True)
    assert off_runner.overlapped_steps == 0
    assert on_runner.fused_steps >= 2  # the whole-batch steps took their samples as built
    assert on_runner.wasted_row_steps >= 1  # and some were not taken
    assert on == off
