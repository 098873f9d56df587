"""Logprobs in both APIs through the real `ollama` and `openai` clients."""

from __future__ import annotations

import httpx
import pytest

MESSAGES = [{"role": "user", "content": "Count to five."}]


def check_greedy(entries, n_tokens, top, text):
    assert len(entries) == n_tokens
    assert "".join(e.token for e in entries) == text
    for e in entries:
        assert e.logprob <= 0
        assert len(e.top_logprobs) == top
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_openai_chat_logprobs_streamed_and_not(oa):
    kw = dict(model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0, seed=1)
    r = oa.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    (choice,) = r.choices
    check_greedy(choice.logprobs.content, r.usage.completion_tokens, 3, choice.message.content)
    streamed = []
    for chunk in oa.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    # The same tokens; the logprobs equal to float32 rounding: the second request restores the
    # prompt from the prefix cache and computes its last token alone, the first computed it in
    # the prompt's one forward (a different matmul shape, so not bit for bit).
    assert [e.token for e in streamed] == [e.token for e in choice.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx(
        [e.logprob for e in choice.logprobs.content], abs=1e-4
    )
    plain = oa.chat.completions.create(**kw)
    assert plain.choices[0].logprobs is None


def test_openai_completions_logprobs(oa):
    r = oa.completions.create(
        model="smollm2", prompt="One, two,", max_tokens=6, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == len(lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(d) <= 2 for d in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_openai_top_logprobs_limits_are_400(live_server):
    for extra in ({"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2}):
        r = httpx.post(
            f"{live_server.url}/v1/chat/completions",
            json={"model": "smollm2", "messages": MESSAGES, **extra},
            timeout=60,
        )
        assert r.status_code == 400 and "top_logprobs" in r.text


def test_ollama_logprobs_chat_and_generate(ol):
    opts = {"temperature": 0, "num_predict": 8}
    r = ol.chat("smollm2", messages=MESSAGES, options=opts, logprobs=True, top_logprobs=2)
    check_greedy(r.logprobs, r.eval_count, 2, r.message.content)
    parts = list(ol.generate("smollm2", prompt="Hi", options=opts, logprobs=True, stream=True))
    entries = [e for p in parts for e in (p.logprobs or [])]
    assert len(entries) == parts[-1].eval_count
    assert "".join(e.token for e in entries) == "".join(p.response for p in parts)
