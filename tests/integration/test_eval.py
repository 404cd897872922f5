"""kvcache.eval on the tiny random model: perplexity, needle cases, streaming, kvpress results."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kvcache.cache.policies.selectors import EVICT_UNIT
from kvcache.eval import perplexity, token_losses
from kvcache.eval import kvpress, needle
from kvcache.eval.corpus import corpus_token_ids
from kvcache.eval.stream import run_stream
from kvcache.models.step import StepInputs, causal_mask


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def ids(tiny_llm):
    return corpus_token_ids(tiny_llm.tokenizer, 240)


def reference_ppl(llm, ids: list[int]) -> float:
    """exp(mean NLL) from one uncached full-attention forward."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = llm.model.forward(StepInputs(x, None, 0, causal_mask(None, 1, 0, x.shape[1], "cpu"), "all"), None)
    return math.exp(F.cross_entropy(logits[0, :-1].double(), x[0, 1:]).item())


def test_full_policy_equals_one_full_forward(tiny_llm, ids):
    got = perplexity(tiny_llm, ids, context_len=200, kv_policy="full", chunk=32)
    want = reference_ppl(tiny_llm, ids[:200])
    assert got == pytest.approx(want, rel=1e-4)


def test_text_is_tokenized_and_windows_are_consecutive(tiny_llm):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    toks = tiny_llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    got = perplexity(tiny_llm, text, context_len=50, windows=2, chunk=16)
    nll = torch.cat([token_losses(tiny_llm, toks[i : i + 50], "full", 16).nll for i in (0, 50)])
    assert got == pytest.approx(math.exp(nll.mean().item()), rel=1e-9)


def test_keep_everything_policies_equal_full_and_a_window_does_not(tiny_llm, ids):
    full = perplexity(tiny_llm, ids, 200, "full")
    for keep_all in ("window:size=10000", "evict:scorer=h2o,budget=10000"):
        assert perplexity(tiny_llm, ids, 200, keep_all) == pytest.approx(full, rel=1e-6)
    assert abs(perplexity(tiny_llm, ids, 200, "window:size=32") / full - 1) > 1e-3


@pytest.mark.parametrize("policy", ["full", "window:size=48", "evict:scorer=snapkv,ratio=0.5"])
def test_a_longer_pass_gives_every_shorter_context(tiny_llm, ids, policy):
    """The sweep reads perplexity at L off one pass over max(L): the same as an L-token run."""
    long = token_losses(tiny_llm, ids[:200], policy, chunk=32)
    assert long.perplexity(0, 99) == pytest.approx(perplexity(tiny_llm, ids, 100, policy), rel=1e-5)


def test_memory_samples_follow_the_policy(tiny_llm, ids):
    losses = token_losses(tiny_llm, ids[:200], "window:size=48", chunk=16)
    assert [s.seen for s in losses.samples] == list(range(16, 200, 16)) + [200]
    assert max(s.held for s in losses.samples) <= 48 + EVICT_UNIT - 1
    per_token = losses.samples[-1].kv_bytes / losses.samples[-1].held
    assert losses.peak_kv_bytes == max(s.held for s in losses.samples) * per_token


def test_bad_perplexity_arguments(tiny_llm, ids):
    from kvcache.errors import KVCacheError

    with pytest.raises(KVCacheError):
        perplexity(tiny_llm, ids[:10], context_len=100)
    with pytest.raises(KVCacheError):
        perplexity(tiny_llm, ids, context_len=1)


# ---------------------------------------------------------------------------------- needle
def test_needle_cases_are_deterministic_and_planted_at_depth(tiny_tokenizer):
    lengths, depths = [300, 600], [0.1, 0.5, 0.9]
    cases = needle.make_cases(tiny_tokenizer, lengths, depths, seed=3)
    assert cases == needle.make_cases(tiny_tokenizer, lengths, depths, seed=3)
    other = needle.make_cases(tiny_tokenizer, lengths, depths, seed=4)
    assert [c.answer for c in cases] != [c.answer for c in other]
    assert [(c.length, c.depth) for c in cases] == [(n, d) for n in lengths for d in depths]
    encode = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for c in cases:
        sentence = needle.NEEDLE.format(code=c.answer)
        assert c.context.count(sentence) == 1 and c.question == needle.QUESTION
        n = len(encode(c.context))
        assert abs(n - c.length) <= 8, (c.id, n)
        before = len(encode(c.context[: c.context.index(sentence)]))
        filler = n - len(encode(sentence + " "))
        assert abs(before / filler - c.depth) < 0.06, (c.id, before / filler)


def test_prompt_parts_follow_the_documented_layout(tiny_tokenizer):
    case = needle.make_cases(tiny_tokenizer, [150], [0.5])[0]
    ctx, q = needle.prompt_parts(tiny_tokenizer, case)
    messages = [{"role": "user", "content": case.context + "\n\n" + case.question}]
    text = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tiny_tokenizer.decode(ctx + q) == text
    assert tiny_tokenizer.decode(ctx).endswith(case.context)
    assert tiny_tokenizer.decode(q).startswith("\n\n" + case.question)


def test_answer_case_prefills_the_context_through_the_policy(tiny_llm):
    case = needle.make_cases(tiny_llm.tokenizer, [150], [0.5])[0]
    ctx, _ = needle.prompt_parts(tiny_llm.tokenizer, case)
    full = needle.answer_case(tiny_llm, case, "full", max_new_tokens=4, chunk=64)
    win = needle.answer_case(tiny_llm, case, "window:size=32", max_new_tokens=4, chunk=64)
    assert full.seen == win.seen == len(ctx) and full.held == len(ctx)
    assert win.held < 32 + 64 and win.kv_bytes < full.kv_bytes
    assert full.correct == needle.is_correct(full.output, case.answer)


def test_scoring_and_cases_file(tmp_path, tiny_tokenizer):
    assert needle.is_correct("The code is 7-4-2-9-1.", "7-4-2-9-1")
    assert needle.is_correct("74291", "7-4-2-9-1") and needle.is_correct("7 4 2 9 1!", "7-4-2-9-1")
    assert not needle.is_correct("7-4-2-9", "7-4-2-9-1") and not needle.is_correct("", "7-4-2-9-1")
    cases = needle.make_cases(tiny_tokenizer, [100], [0.2, 0.8])
    path = needle.write_cases(tmp_path / "c.json", cases, "/models/x")
    doc = json.loads(path.read_text())
    assert set(doc) >= {"model_dir", "cases", "template", "scoring"}
    assert set(doc["cases"][0]) == {"id", "context", "question", "answer", "length", "depth"}
    assert needle.read_cases(path) == ("/models/x", cases)


def test_kvpress_results_are_rescored_and_a_missing_driver_is_a_note(tmp_path, tiny_tokenizer):
    cases = needle.make_cases(tiny_tokenizer, [100], [0.2, 0.8])
    results = [{"press": "snapkv", "ratio": 0.5, "id": cases[0].id, "output": cases[0].answer, "correct": False},
               {"press": "snapkv", "ratio": 0.5, "id": cases[1].id, "output": "no idea", "correct": True},
               {"press": "knorm", "ratio": 0.75, "id": "unknown", "output": "", "correct": True}]
    groups = kvpress.group(results, cases)
    assert list(groups) == [("snapkv", 0.5)]
    assert [a["correct"] for a in groups[("snapkv", 0.5)]] == [True, False]
    notes = []
    assert kvpress.run_driver(None, tmp_path / "c.json", ["snapkv"], [0.5], tmp_path / "r.json", notes.append) is None
    assert kvpress.run_driver(str(tmp_path / "nope"), tmp_path / "c.json", ["snapkv"], [0.5], tmp_path / "r.json",
                              notes.append) is None
    assert len(notes) == 2 and all("skipped" in n for n in notes)


# ------------------------------------------------------------------------------- streaming
def test_stream_with_sinks_holds_bounded_memory(tiny_llm):
    r = run_stream(tiny_llm, "sinks:n_sink=4,window=60", tokens=400, edge=50, chunk=16)
    bound = (4 + 60 + EVICT_UNIT - 1) * r.losses.samples[0].kv_bytes // r.losses.samples[0].held
    assert r.kv_bytes_max <= bound and r.kv_bytes_after_fill[1] <= bound
    assert r.losses.nll.shape == (399,) and math.isfinite(r.ppl_first) and math.isfinite(r.ppl_last)
    assert r.losses.samples[-1].seen == 400
