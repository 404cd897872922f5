"""Importance eviction on the paged engine (policy `evict:...`, decode=false).

The engine prefills each prompt with full attention, scoring it chunk by chunk, then keeps
per layer and KV head the best tokens plus the recent window in fresh blocks of the request.
So a request's tokens equal the per-sequence `SequenceCache` that sees the whole prompt in one
chunk (kvpress's way), whatever the chunking, batching, preemption or prefix hits.
"""

from __future__ import annotations


import pytest

import kvcache
from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.policies.scorers import SCORERS
from kvcache.errors import KVCacheError
from tests.helpers import greedy, paged_llm, policy_cache_greedy, random_requests

BS = 16
INT8 = "+quantized:bits=8,group_size=8,key_axis=token,residual=0"  # evicted over quantized blocks
# every registered scorer that runs on paged blocks (as many tokens in every layer), over float and
# over quantized blocks, and one budget instead of a ratio
PAGED_SCORERS = [name for name, s in SCORERS.items() if not s.ragged_layers]
POLICIES = [f"evict:scorer={name},ratio=0.5,window=8{store}" for name in PAGED_SCORERS for store in ("", INT8)]
POLICIES.append("evict:scorer=h2o,budget=20,window=4")
IDS = [p.split(",")[0].removeprefix("evict:scorer=") + ("-int8" if "quantized" in p else "") for p in POLICIES]
IDS[-1] = "h2o-budget"


def key_only(policy: str) -> bool:
    """Whether the policy's scorer ranks by the keys alone (so its prompts may hit the prefix cache)."""
    return not SCORERS[parse_policy(policy).selectors[0].params["scorer"]].needs_queries


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


def make_llm(tiny_model_dir, policy: str, blocks: int = 256, **kw) -> kvcache.LLM:
    return paged_llm(tiny_model_dir, policy, blocks, BS, **kw)


def policy_cache_tokens(llm, policy: str, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens on a SequenceCache that sees the whole prompt as one chunk, then decodes."""
    return policy_cache_greedy(llm.model, policy, prompt, n, token_at_a_time=False)


def workload(vocab: int, n: int = 10):
    """Greedy requests: a third share a 32-id prefix; prompts 3-80 ids, 5-25 new tokens."""
    return random_requests(vocab, n, 5, 32, lambda i: i % 3 == 0, (3, 48), (5, 25))


def test_grammar_runs_evict_after_the_prompt_paged():
    assert paged_plan(parse_policy(POLICIES[0])).evict is not None and paged_plan(parse_policy(POLICIES[0])) is not None
    assert paged_plan(parse_policy("evict:ratio=0.5,decode=true")) is None  # evicting while decoding: per sequence
    assert paged_plan(parse_policy("evict:ratio=0.5+quantized:bits=8,key_axis=token,residual=0")) is not None
    assert paged_plan(parse_policy("evict:ratio=0.5+quantized:bits=8")) is None  # KIVI's exact tail: per sequence
    assert parse_policy("evict:ratio=0.5,pool=7").selectors[0].params["pool"] == 7
    with pytest.raises(KVCacheError, match="pool must be odd"):
        parse_policy("evict:ratio=0.5,pool=8")


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_each_request_equals_the_policy_cache_over_its_whole_prompt(tiny_model_dir, policy):
    llm = make_llm(tiny_model_dir, policy, max_num_batched_tokens=24)  # prompts run in chunks
    prompts, params = workload(llm.config.vocab_size)
    outs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["tokens_evicted"] > 0 and stats["blocks_used"] == 0
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == policy_cache_tokens(llm, policy, p, sp.max_tokens)
        kept = min(len(p), parse_policy(policy).selectors[0].params["budget"] or -(-len(p) // 2))  # or ratio 0.5
        slots = kept + len(out.token_ids) - 1  # the kept prompt tokens, then each generated one fed back
        block = BS * llm.engine.storage.bytes_per_token  # float K/V, or codes and scales
        assert out.metrics.kv_cache_bytes == -(-slots // BS) * block  # whole blocks, the last partly filled


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_batched_with_preemption_and_prefix_hits_equals_alone(tiny_model_dir, policy):
    small = make_llm(tiny_model_dir, policy, blocks=10, max_num_batched_tokens=32)
    prompts, params = workload(small.config.vocab_size)
    outs = small.generate(prompts, params)
    stats = small.stats()
    assert stats["preemptions"] > 0 and stats["blocks_used"] == 0
    if key_only(policy):  # scorers that need queries cap or refuse prefix hits
        assert stats["prefix_hits"] > 0
    alone = make_llm(tiny_model_dir, policy, max_num_batched_tokens=512, enable_prefix_caching=False)
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == alone.generate([p], sp)[0].token_ids


def test_compressed_blocks_leave_the_prefix_cache_but_the_prompt_blocks_stay(tiny_model_dir):
    """A repeated prompt hits the blocks its first run prefilled (full attention, shareable);
    the compressed copy is the request's own."""
    llm = make_llm(tiny_model_dir, "evict:scorer=knorm,ratio=0.5,window=8")  # keys alone: prefix hits allowed
    prompt = list(range(5, 5 + 70))
    first = llm.generate([prompt], greedy(6))[0]
    again = llm.generate([prompt], greedy(6))[0]
    assert again.metrics.cached_prompt_tokens == 64 and again.token_ids == first.token_ids


def test_a_compression_that_finds_no_blocks_preempts_and_the_rerun_equals_the_policy_cache(tiny_model_dir):
    """Two requests hit the same cached prompt blocks while the pool is full: the first to
    compress cannot get fresh blocks (every prompt block it holds is shared), so it is
    preempted instead, recomputed later, and still gives the SequenceCache's tokens; nothing leaks."""
    policy = "evict:scorer=knorm,ratio=0.25,window=8"
    llm = make_llm(tiny_model_dir, policy, blocks=9, max_num_batched_tokens=64)
    engine = llm.engine
    failed, compact = [], engine.kv.compact

    def watched(*args, **kw):
        table = compact(*args, **kw)
        failed.append(table is None)
        return table

    engine.kv.compact = watched
    prompt = list(range(5, 69))  # 64 ids: 3 blocks served from the cache, the last computed
    first = engine.add_request(prompt, greedy(30))
    while not first.output_token_ids:
        engine.step()
    twins = [engine.add_request(prompt, greedy(6)) for _ in range(2)]  # both hit first's cached prompt blocks
    engine.run_to_completion([first, *twins])
    assert any(failed) and engine.scheduler.num_preemptions >= 1
    want = policy_cache_tokens(llm, policy, prompt, 30)
    for r in (first, *twins):
        assert r.error is None and r.output_token_ids == want[: len(r.output_token_ids)]
    assert all(r.num_evicted_tokens == 64 - 48 for r in twins)
    assert llm.stats()["blocks_used"] == 0
