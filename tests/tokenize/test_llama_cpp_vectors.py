"""Conformance with llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf.inp/.out).

Compared like llama.cpp's tests/test-tokenizer-0.cpp: `common_tokenize(ctx, text,
add_special=false, parse_special=false)`, inputs separated by "\\n__ggml_vocab_test__\\n", one
line of space-separated ids per input in the .out file. Every known mismatch is listed in
`KNOWN_MISMATCHES` as a strict xfail with its reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SEPARATOR = "\n__ggml_vocab_test__\n"

VOCABS = [
    "gpt-2",
    "qwen2",
    "llama-bpe",
    "llama-spm",
    "phi-3",
    "starcoder",
    "refact",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "mpt",
    "qwen35",
]

# Cases per vocab file: llama.cpp ships the same 46 inputs everywhere but qwen35.
N_CASES = {"qwen35": 50}

# (vocab, case index) -> reason. Strict xfails: a fix makes them fail loudly.
KNOWN_MISMATCHES: dict[tuple[str, int], str] = {}


def read_cases(folder: Path, vocab: str) -> list[tuple[str, list[int]]]:
    base = folder / f"ggml-vocab-{vocab}.gguf"
    raw = base.with_name(base.name + ".inp").read_text(encoding="utf-8")
    inputs = raw.split(SEPARATOR)
    if raw.endswith(SEPARATOR):  # test-tokenizer-0.cpp stops at the end: no empty last case
        inputs.pop()
    outputs = base.with_name(base.name + ".out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs), vocab
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outputs, strict=True)]


def _params() -> list:
    params = []
    for vocab in VOCABS:
        for i in range(N_CASES.get(vocab, 46)):
            marks = []
            reason = KNOWN_MISMATCHES.get((vocab, i))
            if reason:
                marks.append(pytest.mark.xfail(reason=reason, strict=True))
            params.append(pytest.param(vocab, i, marks=marks, id=f"{vocab}-{i}"))
    return params


@pytest.mark.parametrize(("vocab", "index"), _params())
def test_llama_cpp_vector(
    llama_cpp_vocab_dir: Path, llama_cpp_tokenizer, vocab: str, index: int
) -> None:
    cases = read_cases(llama_cpp_vocab_dir, vocab)
    assert len(cases) == N_CASES.get(vocab, 46), "the vector file changed: update N_CASES"
    text, expected = cases[index]
    tok = llama_cpp_tokenizer(vocab)
    assert tok.encode(text, add_special=False, parse_special=False) == expected, repr(text)
