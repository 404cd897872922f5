"""Policies paged blocks cannot hold, run on the engine with per-request caches.

KIVI `quantized` (per-channel keys, exact residual and sinks), `tiered`, `evict:decode=true`
and compositions run in the continuous batch, each request on its own `SequenceCache`
(`cache.row_policy`). Prompts are computed in fixed pieces, so every request equals a
`SequenceCache` fed the same pieces alone, batched or preempted; and what a request's cache
holds never passes the blocks the scheduler granted it.
"""

from __future__ import annotations

import pytest
import torch

from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.policies.scorers import SCORERS
from kvcache.cache.row_policy import policy_footprint
from tests.helpers import greedy, paged_llm, policy_cache_greedy, random_requests

BS = 16
PIECE = 16  # max_num_batched_tokens=32 below: prompts are computed in 16-token pieces
POLICIES = [
    "quantized:bits=4,group_size=16,residual=16",  # KIVI: keys per channel, exact tail
    "quantized:bits=2,group_size=16,residual=8,n_sink=4",  # exact sinks too
    "tiered:hot=16,warm_bits=4,warm=32,cold=disk,group_size=16",  # oldest tokens to a memory-mapped file
    *(f"evict:scorer={name},budget=40,decode=true" for name in SCORERS),  # evicting while decoding
    "evict:scorer=snapkv,ratio=0.5,window=8+quantized:bits=4,group_size=16,residual=16",  # after each piece
    "sinks:n_sink=4,window=28+quantized:bits=8,group_size=16,residual=16",  # windowed: blocks go back
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


def workload(vocab: int, n: int = 8):
    """Greedy requests: prompts 5-60 ids (most span several pieces and pass the residual), 10-40 new."""
    return random_requests(vocab, n, 5, 0, lambda i: False, (5, 60), (10, 40))


def alone(llm, policy: str, prompt: list[int], n: int) -> list[int]:
    return policy_cache_greedy(llm.model, policy, prompt, n, piece=PIECE)


@pytest.mark.parametrize("policy", POLICIES)
def test_grammar_sends_them_to_per_request_caches(policy):
    assert paged_plan(parse_policy(policy)) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_with_preemption_equals_each_request_alone(tiny_model_dir, policy):
    llm = paged_llm(tiny_model_dir, policy, blocks=64, max_num_batched_tokens=32)
    fp = policy_footprint(llm.kv_policy, llm.config, llm.dtype, PIECE)
    # a pool for about two sequences at once: preemption is forced
    blocks = -(-max(2 * fp.slots(60), fp.slots(110)) // BS)  # the longest request (100 tokens) fits alone
    llm = paged_llm(tiny_model_dir, policy, blocks=blocks, max_num_batched_tokens=32)
    prompts, params = workload(llm.config.vocab_size)
    engine, rate = llm.engine, llm.engine_bytes_per_token
    worst = []

    def watch(_):  # what each cache holds against the blocks granted to its request
        for rid in engine.runner.caches:
            granted = len(engine.kv.block_table(rid)) * BS * rate
            worst.append(engine.runner.bytes_held(rid) / granted)
        assert engine.stats()["kv_bytes_held"] == sum(engine.runner.bytes_held(r) for r in engine.runner.caches)

    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.run_to_completion(requests, on_step=watch)
    for p, sp, r in zip(prompts, params, requests):
        assert r.error is None and r.output_token_ids == alone(llm, policy, p, sp.max_tokens), r.request_id
    assert engine.scheduler.num_preemptions > 0
    assert 0 < max(worst) <= 1.0
    st = llm.stats()
    assert st["blocks_used"] == 0 and st["running"] == 0 and not engine.runner.caches


def test_generate_runs_them_in_one_batch_and_reports_what_each_cache_held(tiny_model_dir):
    policy = POLICIES[0]
    llm = paged_llm(tiny_model_dir, policy, blocks=4096, max_num_batched_tokens=32)
    prompts, params = workload(llm.config.vocab_size, 6)
    outs = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == alone(llm, policy, p, sp.max_tokens)
        # the cache's own report: quantized groups + exact tail, less than the dense cache
        assert 0 < out.metrics.kv_cache_bytes < (len(p) + sp.max_tokens) * llm.kv_bytes_per_token


def test_a_window_over_a_per_request_cache_holds_a_bounded_grant(tiny_model_dir):
    """sinks + KIVI on a 337-token stream: the grant stops growing at what sinks + window (+ a
    unit and a piece) can hold, well under what the same store without sinks needs."""
    policy = POLICIES[-1]
    llm = paged_llm(tiny_model_dir, policy, blocks=4096, max_num_batched_tokens=32, max_model_len=1024)
    engine = llm.engine
    fp = engine.storage.footprint
    peak = 0

    def watch(_):
        nonlocal peak
        for rid in engine.runner.caches:
            peak = max(peak, len(engine.kv.block_table(rid)))

    req = engine.add_request(list(range(3, 40)), greedy(300))
    engine.run_to_completion([req], on_step=watch)
    assert req.output_token_ids == alone(llm, policy, list(range(3, 40)), 300)
    assert fp.held_cap == 4 + 28 + 16 + PIECE and fp.slots(10**6) == fp.slots(fp.held_cap)
    unbounded = policy_footprint(parse_policy(policy.split("+")[1]), llm.config, llm.dtype, PIECE)
    assert peak == -(-fp.slots(fp.held_cap) // BS) < -(-unbounded.slots(337) // BS)


def feed_pieces(model, cache, ids: list[int]):
    """Feed `ids` to a cache that has seen `cache.seen` tokens, in pieces ending at multiples
    of PIECE (as the engine cuts prompts); the last piece's logits (1, V)."""
    from kvcache.models.step import StepInputs

    pos, end = cache.seen, cache.seen + len(ids)
    with torch.inference_mode():
        while pos < end:
            stop = min(end, (pos // PIECE + 1) * PIECE)
            piece = torch.tensor([ids[pos - end + len(ids) : stop - end + len(ids)]])  # (1, T)
            logits = model.forward(StepInputs(piece, None, cache.next_position, None), cache)
            pos = stop
    return logits


def continue_greedy(model, cache, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after feeding `ids` to `cache` (in the engine's pieces), fed back one at a time."""
    logits, out = feed_pieces(model, cache, ids), []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        if len(out) < n:
            logits = feed_pieces(model, cache, out[-1:])
    return out


@pytest.mark.parametrize("policy", [POLICIES[0], POLICIES[-1]], ids=["kivi", "sinks+kivi"])
def test_a_conversation_continues_the_cache_its_last_request_kept(tiny_model_dir, policy):
    """No prefix cache holds a per-request cache, so a finished request of a conversation leaves
    its cache (and its grant of blocks) for the conversation's next request, which computes only
    the tokens after those: each equals one SequenceCache fed the whole conversation, even after
    the window evicted tokens."""
    from kvcache.cache.policies.cache import SequenceCache

    llm = paged_llm(tiny_model_dir, policy, blocks=4096, max_num_batched_tokens=32)
    engine, model = llm.engine, llm.model
    ref, prompt = SequenceCache(model, policy), list(range(3, 40))
    for turn in range(3):
        prefilled = llm.stats()["tokens_prefilled"]
        req = engine.add_request(prompt, greedy(12), conversation="c")
        engine.run_to_completion([req])
        computed = ref.seen
        assert req.num_cached_tokens == computed and (computed > 0) == (turn > 0)
        assert llm.stats()["tokens_prefilled"] - prefilled == len(prompt) - computed
        assert req.output_token_ids == continue_greedy(model, ref, prompt[computed:], 12)
        prompt = prompt + req.output_token_ids + list(range(50 + turn, 70 + turn))
    assert ref.evicted > 0 or "sinks" not in policy  # the window did drop tokens on the way
    assert llm.stats()["blocks_used"] > 0  # the kept cache's grant
    engine.end_conversation("c")
    assert llm.stats()["blocks_used"] == 0 and not engine.runner.caches


def test_chat_turns_under_a_per_request_policy_start_from_the_kept_cache(tiny_model_dir):
    """A chat turn adopts the cache its last turn kept: it computes only the tokens the new
    prompt does not share with it (cut back to them where the template re-renders the reply
    differently) and equals one SequenceCache fed the conversation as the turns fed it."""
    from kvcache.cache.policies.cache import SequenceCache
    from kvcache.engine.kept_caches import common_prefix_len

    policy = POLICIES[0]
    llm = paged_llm(tiny_model_dir, policy, blocks=4096, max_num_batched_tokens=32)
    model, s = llm.model, llm.session(system="You are a tiny robot who loves the stars.")
    ref, fed = SequenceCache(model, policy), []
    for turn, text in enumerate(["Hello, how are you?", "Tell me a joke about a computer.", "What is your name?"]):
        prefilled = llm.stats()["tokens_prefilled"]
        out = s.send(text, greedy(8))
        prompt = out.prompt_token_ids
        shared = common_prefix_len(fed, prompt)
        with torch.inference_mode():
            ref.truncate(shared)
        assert out.metrics.cached_prompt_tokens == shared and (shared > 0) == (turn > 0)
        assert llm.stats()["tokens_prefilled"] - prefilled == len(prompt) - shared
        assert out.token_ids == continue_greedy(model, ref, prompt[shared:], 8)
        fed = prompt + out.token_ids[:-1]
        stats = s.stats()
        assert stats["cached_tokens"] == len(fed) and stats["kv_cache_bytes"] == ref.nbytes_used > 0
    assert llm.stats()["blocks_used"] > 0
    s.reset()
    assert llm.stats()["blocks_used"] == 0 and not llm.engine.runner.caches


def test_a_kept_chat_cache_goes_before_a_request_waits_for_blocks(tiny_model_dir):
    """A kept cache is idle memory: a request that needs its blocks gets them (no preemption,
    no failure), and the chat's next turn then starts from its first token."""
    policy = POLICIES[0]
    llm = paged_llm(tiny_model_dir, policy, blocks=4096, max_num_batched_tokens=32)
    fp = policy_footprint(llm.kv_policy, llm.config, llm.dtype, PIECE)
    blocks = -(-fp.slots(120) // BS)
    llm = paged_llm(tiny_model_dir, policy, blocks=blocks, max_num_batched_tokens=32)
    s = llm.session(system="You are a tiny robot who loves the stars.")
    s.send("Hello, how are you?", greedy(8))
    held = llm.stats()["blocks_used"]
    assert held > 0
    n = next(n for n in range(8, 110) if -(-fp.slots(n + 8) // BS) > blocks - held)
    req = llm.engine.add_request(list(range(3, 3 + n)), greedy(8))
    for _ in range(100):  # stepped by hand: with its blocks held elsewhere it would preempt itself forever
        if req.finished:
            break
        llm.engine.step()
    out = req.to_output()
    assert req.finished and out.error is None and out.metrics.preemptions == 0
    assert out.token_ids == alone(llm, policy, list(range(3, 3 + n)), 8)
    assert s.stats()["cached_tokens"] == 0 and llm.stats()["blocks_used"] == 0
    again = s.send("Tell me a joke about a computer.", greedy(8))
    assert again.metrics.cached_prompt_tokens == 0 and again.error is None
