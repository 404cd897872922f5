"""n samples of one prompt (`SamplingParams(n=...)`) on the tiny random-weight Llama.

The equivalence backbone: greedy samples all equal the n=1 output, and seeded sample i equals
one request run alone with seed + i (on an LLM without prefix caching, so nothing is shared
there). On paged blocks the prompt is computed once and its blocks are shared; the partly
filled last block is copied when a sample first writes into it; every reference goes back
after completion, preemption and abort.
"""

from __future__ import annotations

import random

import pytest

import kvcache
from kvcache import SamplingParams
from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.policies.registry import POLICIES
from kvcache.errors import KVCacheError
from tests.helpers import paged_llm

BS = 4
MID_BLOCK = [5 + (7 * i) % 300 for i in range(10)]  # 10 ids: the prompt ends inside its third block
ON_BOUNDARY = MID_BLOCK[:8]  # 8 ids: two full blocks, nothing to copy
SEEDED = dict(max_tokens=12, temperature=0.9, top_p=0.95, ignore_eos=True, seed=21)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


def make_llm(model_dir, num_blocks: int = 64, **kw) -> kvcache.LLM:
    probe = kvcache.LLM(str(model_dir), progress=False, kv_cache_memory=1 << 20)
    return kvcache.LLM(str(model_dir), dtype="float32", device="cpu", progress=False, block_size=BS,
                       kv_cache_memory=num_blocks * BS * probe.kv_bytes_per_token, **kw)


@pytest.fixture(scope="module")
def ref_llm(tiny_model_dir):
    """Single requests, one at a time, no prefix cache."""
    return make_llm(tiny_model_dir, 256, enable_prefix_caching=False)


def alone(llm, prompt, **params) -> list[int]:
    return llm.generate([prompt], SamplingParams(**params))[0].token_ids


def seeded_alone(ref_llm, prompt, n: int, **params) -> list[list[int]]:
    p = {**SEEDED, **params}
    return [alone(ref_llm, prompt, **{**p, "seed": p["seed"] + i}) for i in range(n)]


def check_pool_back(llm, free_before: int) -> None:
    s = llm.stats()
    assert s["blocks_free"] == free_before and s["blocks_used"] == 0, s
    assert s["running"] == 0 and s["waiting"] == 0
    assert llm.engine.kv.num_seqs == 0 and not llm.engine.requests and not llm.engine.groups
    llm.engine.kv.pool.check_invariants()


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.completions]


@pytest.mark.parametrize("prompt", [MID_BLOCK, ON_BOUNDARY], ids=["mid-block", "on-boundary"])
def test_greedy_samples_all_equal_the_single_output(tiny_model_dir, ref_llm, prompt):
    llm = make_llm(tiny_model_dir)
    want = alone(ref_llm, prompt, max_tokens=10, temperature=0.0, ignore_eos=True)
    out = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, n=4))[0]
    assert [c.index for c in out.completions] == [0, 1, 2, 3]
    assert tokens(out) == [want] * 4
    assert out.token_ids == want and out.text == out.completions[0].text  # the n=1 fields: sample 0
    assert out.metrics.prompt_tokens == len(prompt) and out.metrics.generated_tokens == 40


@pytest.mark.parametrize("prompt", [MID_BLOCK, ON_BOUNDARY], ids=["mid-block", "on-boundary"])
def test_seeded_sample_i_equals_a_single_request_with_seed_plus_i(tiny_model_dir, ref_llm, prompt):
    llm = make_llm(tiny_model_dir, enable_prefix_caching=False)
    free = llm.stats()["blocks_free"]
    engine = llm.engine
    out = llm.generate([prompt], SamplingParams(n=5, **SEEDED))[0]
    want = seeded_alone(ref_llm, prompt, 5)
    assert len(set(map(tuple, want))) > 1, "seeds meant to give different samples"
    assert tokens(out) == want
    assert engine.tokens_prefilled == len(prompt)  # the prompt once, not 5 times
    # the shared partly filled block is copied once for each sample but the last to write into it
    assert engine.kv.num_copies == (4 if len(prompt) % BS else 0)
    check_pool_back(llm, free)


def test_blocks_held_at_the_peak_are_the_prompts_once_plus_each_samples_own(tiny_model_dir):
    engine = make_llm(tiny_model_dir, num_blocks=128, enable_prefix_caching=False).engine
    prompt, n, new = (MID_BLOCK * 3)[:30], 8, 12  # 30 ids: 8 blocks, the last half full
    req = engine.add_request(prompt, SamplingParams(n=n, **{**SEEDED, "max_tokens": new}))
    peak = 0
    while not all(r.finished for r in req.group):
        engine.step()
        peak = max(peak, engine.kv.usage()["blocks_used"])
    prompt_blocks, output_blocks = -(-len(prompt) // BS), -(-new // BS)
    assert peak <= prompt_blocks + n * output_blocks + n  # the bound: shared prompt, one copy each
    assert peak < n * -(-(len(prompt) + new) // BS)  # well under n separate requests
    assert engine.kv.num_copies == n - 1


def test_one_sample_with_n_1_is_unchanged(tiny_model_dir, ref_llm):
    llm = make_llm(tiny_model_dir)
    out = llm.generate([MID_BLOCK], SamplingParams(**SEEDED))[0]
    assert [c.token_ids for c in out.completions] == [out.token_ids] == seeded_alone(ref_llm, MID_BLOCK, 1)
    assert out.completions[0].finish_reason == out.finish_reason == "length"


def test_several_prompts_each_with_n_samples_in_one_batch(tiny_model_dir, ref_llm):
    llm = make_llm(tiny_model_dir)
    prompts = [MID_BLOCK, ON_BOUNDARY[:6], MID_BLOCK[3:]]
    outs = llm.generate(prompts, SamplingParams(n=3, **SEEDED))
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt and tokens(out) == seeded_alone(ref_llm, prompt, 3)


def test_samples_preempted_for_blocks_are_recomputed_and_every_block_goes_back(tiny_model_dir, ref_llm):
    llm = make_llm(tiny_model_dir, num_blocks=14, max_num_batched_tokens=16)
    free = llm.stats()["blocks_free"]
    params = {**SEEDED, "max_tokens": 30}
    out = llm.generate([MID_BLOCK], SamplingParams(n=4, **params))[0]
    assert llm.stats()["preemptions"] > 0, "14 blocks cannot hold 4 samples of 40 tokens"
    assert out.metrics.preemptions == llm.stats()["preemptions"]
    assert tokens(out) == seeded_alone(ref_llm, MID_BLOCK, 4, max_tokens=30)
    check_pool_back(llm, free)


@pytest.mark.parametrize("steps", [0, 2, 3, 5], ids=["queued", "mid-prompt", "at-the-fork", "mid-decode"])
def test_aborting_the_request_frees_every_sample_once(tiny_model_dir, steps):
    llm = make_llm(tiny_model_dir, max_num_batched_tokens=4)  # the prompt's 10 ids take three steps
    engine = llm.engine
    free = llm.stats()["blocks_free"]
    req = engine.add_request(MID_BLOCK, SamplingParams(n=3, **SEEDED), request_id="r")
    for _ in range(steps):
        engine.step()
    if steps == 3:  # forked: three samples on the prompt's three blocks, one reference each
        assert len(engine.scheduler.running) == 3 and engine.kv.usage()["blocks_used"] == 3
        assert [engine.kv.pool.blocks[b].ref_count for b in engine.kv.block_table("r#0")] == [3, 3, 3]
    engine.abort("r")
    assert all(s.finished and s.finish_reason == "abort" for s in req.group)
    check_pool_back(llm, free)


def test_one_token_samples_finish_at_the_fork(tiny_model_dir, ref_llm):
    llm = make_llm(tiny_model_dir)
    free = llm.stats()["blocks_free"]
    out = llm.generate([MID_BLOCK], SamplingParams(n=3, **{**SEEDED, "max_tokens": 1}))[0]
    assert tokens(out) == seeded_alone(ref_llm, MID_BLOCK, 3, max_tokens=1)
    check_pool_back(llm, free)


def test_a_prompt_that_can_never_fit_fails_every_sample(tiny_model_dir):
    llm = make_llm(tiny_model_dir, num_blocks=2)
    out = llm.generate([MID_BLOCK], SamplingParams(n=3, **SEEDED))[0]
    assert [c.finish_reason for c in out.completions] == ["error"] * 3 and "KV cache" in out.error
    assert not llm.engine.requests and not llm.engine.groups


def test_bad_n_and_streaming_n_samples_are_refused(tiny_llm):
    for n in (0, -1, 1.5, True):
        with pytest.raises(KVCacheError, match="n must be a positive integer"):
            SamplingParams(n=n)
    with pytest.raises(KVCacheError, match="Streaming follows one sample"):
        next(tiny_llm.stream("Hello", SamplingParams(n=2, max_tokens=2)))


EXAMPLES = [text for cls in POLICIES.values() for text in cls.examples]


@pytest.mark.parametrize("policy", EXAMPLES)
def test_every_policy_gives_each_sample_its_single_request(tiny_model_dir, policy):
    """Paged policies fork the computed prompt; per-request stores run n requests of the prompt."""
    llm = paged_llm(tiny_model_dir, policy, blocks=64, max_num_batched_tokens=32, enable_prefix_caching=False)
    prompt = [random.Random(3).randrange(3, 390) for _ in range(37)]  # 2 full blocks of 16 and 5 ids
    params = dict(max_tokens=16, ignore_eos=True, temperature=0.8, seed=11)
    out = llm.generate([prompt], SamplingParams(n=3, **params))[0]
    want = [alone(llm, prompt, **{**params, "seed": 11 + i}) for i in range(3)]
    assert tokens(out) == want
    forked = paged_plan(parse_policy(policy)) is not None
    assert llm.engine.kv.num_copies == (2 if forked else 0)
    assert llm.stats()["tokens_prefilled"] == len(prompt) * (1 if forked else 3) + 3 * len(prompt)
    assert llm.stats()["blocks_used"] == 0
