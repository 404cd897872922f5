"""Attention sinks on the paged engine (policy `sinks:n_sink=N,window=W`).

The engine keeps each sequence's sink blocks, frees window blocks as the window moves, and
masks every query by its own position; the sinks meet the query at its cache position. So a
request's tokens equal the per-sequence `SequenceCache` fed one token at a time, whatever the
batching, chunking, preemption or prefix hits, and streams run past the model's trained
length with a bounded number of blocks.
"""

from __future__ import annotations


import pytest

import kvcache
from kvcache.cache.manager import RELEASED
from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.grammar import parse_policy
from tests.helpers import greedy, paged_llm, policy_cache_greedy, random_requests

BS = 16  # SequenceCache drops 16-token units: the same boundaries as these blocks
POLICY = "sinks:n_sink=4,window=24"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


def make_llm(tiny_model_dir, policy: str = POLICY, blocks: int = 512, **kw) -> kvcache.LLM:
    return paged_llm(tiny_model_dir, policy, blocks, BS, **kw)


def alone_token_by_token(llm, policy: str, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of one prompt on a SequenceCache fed a token at a time (no chunk effects)."""
    return policy_cache_greedy(llm.model, policy, prompt, n, token_at_a_time=True)


def workload(vocab: int, n: int = 10):
    """Greedy requests: half share a 20-id prefix; prompts 5-70 ids (most past the window), 10-50 new."""
    return random_requests(vocab, n, 11, 20, lambda i: i % 2, (5, 50), (10, 50))


def test_grammar_runs_sinks_paged_alone_or_over_paged_quantized_blocks():
    assert paged_plan(parse_policy(POLICY)).sinks == (4, 24)
    assert paged_plan(parse_policy("sinks:n_sink=4,window=60+quantized:bits=8,key_axis=token,residual=0")) is not None
    assert paged_plan(parse_policy("sinks:n_sink=4,window=60+quantized:bits=8")) is None  # KIVI exact tail
    assert paged_plan(parse_policy("sinks+evict:ratio=0.5")) is None


def test_each_request_equals_the_per_sequence_cache_token_by_token(tiny_model_dir):
    llm = make_llm(tiny_model_dir, max_num_batched_tokens=32)  # prompts run in chunks
    prompts, params = workload(llm.config.vocab_size)
    outs = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == alone_token_by_token(llm, POLICY, p, sp.max_tokens)
    assert llm.stats()["blocks_used"] == 0


@pytest.mark.parametrize("prefix", [True, False])
def test_batched_with_preemption_and_prefix_hits_equals_alone(tiny_model_dir, prefix):
    small = make_llm(tiny_model_dir, blocks=12, enable_prefix_caching=prefix, max_num_batched_tokens=24)
    prompts, params = workload(small.config.vocab_size)
    outs = small.generate(prompts, params)
    stats = small.stats()
    assert stats["preemptions"] > 0 and stats["blocks_used"] == 0
    if prefix:
        assert stats["prefix_hits"] > 0
    big = make_llm(tiny_model_dir, max_num_batched_tokens=512)  # one chunk per prompt, one request at a time
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == big.generate([p], sp)[0].token_ids


def test_stream_past_three_times_the_trained_length_keeps_the_sinks_and_few_blocks(tiny_model_dir):
    limit = 256  # the tiny model's max_position_embeddings
    llm = make_llm(tiny_model_dir, max_model_len=4 * limit, blocks=8)  # 8 blocks hold 128 tokens
    assert llm.config.max_position_embeddings == limit
    engine = llm.engine
    prompt = [5 + i % 50 for i in range(40)]
    req = engine.add_request(prompt, greedy(3 * limit + 20), eos_ids=set())
    most, sink_block = 0, None
    while not req.finished:
        engine.step()
        if req.request_id in engine.kv:
            table = engine.kv.block_table(req.request_id)
            sink_block = table[0] if sink_block is None else sink_block
            assert table[0] == sink_block != RELEASED  # the sinks' block is kept for the whole stream
            most = max(most, sum(b != RELEASED for b in table))
    assert req.error is None and len(req.output_token_ids) == 3 * limit + 20
    assert most <= 1 + -(-(24 + BS) // BS) + 1  # sink block + window + the block being filled
    assert engine.stats()["blocks_used"] == 0
    alone = alone_token_by_token(llm, POLICY, prompt, 3 * limit + 20)
    assert req.output_token_ids == alone


def test_sinks_over_quantized_blocks_equal_alone(tiny_model_dir):
    policy = "sinks:n_sink=4,window=24+quantized:bits=8,group_size=8,key_axis=token,residual=0"
    llm = make_llm(tiny_model_dir, policy, max_num_batched_tokens=32)
    prompts, params = workload(llm.config.vocab_size, n=6)
    outs = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == llm.generate([p], sp)[0].token_ids
