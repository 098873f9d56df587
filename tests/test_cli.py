"""`kvgrove run`: one generation through the server's engine, the same text the core computes."""

from __future__ import annotations

import pytest

from kvgrove import cli
from kvgrove.models.generate import generate
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


def test_run_prints_the_greedy_continuation_of_the_core(tiny_llama, capsys):
    lm = load(tiny_llama)
    prompt = "hello world"
    ids = lm.tokenizer.encode(prompt, add_special=True)
    detok = lm.tokenizer.detokenizer()
    text = ""
    for step in generate(
        lm.model, ids, SamplingParams(temperature=0), max_tokens=8, stop_ids=lm.tokenizer.eos_ids
    ):
        if step.token in lm.tokenizer.eos_ids:
            break
        text += detok.add(step.token)
    text += detok.flush()
    assert text  # something to compare
    argv = ["-v", "run", prompt, "--model", tiny_llama, "--raw", "--temperature", "0"]
    assert cli.main([*argv, "--num-predict", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == text + "\n"
    assert f"prompt: {len(ids)} tokens" in err


def test_run_rejects_a_prompt_past_the_context(tiny_llama, capsys):
    limit = load(tiny_llama).info.context_length
    argv = ["run", "a " * (limit + 10), "--model", tiny_llama, "--raw"]
    assert cli.main(argv) == 2
    assert "exceeds the model's maximum context length" in capsys.readouterr().err
