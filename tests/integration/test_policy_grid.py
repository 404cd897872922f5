"""The equivalence grid, generated from the policy registry: every example a policy class
declares (`Policy.examples`) runs through every path the engine takes for it and must give
the tokens of its one-sequence reference, a `SequenceCache` on the same model.

Paths, all in one run: requests batched in one continuous batch, prompts in chunks
(`max_num_batched_tokens`), a pool small enough that requests are preempted and recomputed,
half of them sharing a prefix (prefix-cache hits where the path shares blocks); and each
request alone on the engine. The reference is fed as the engine computes the policy:
- paged blocks (`paged_plan` not None): token by token, since block-aligned eviction makes
  the paged result independent of chunking; for `evict` (compressed once after the prompt)
  the whole prompt in one chunk;
- per-request stores (`paged_plan` None): the engine's prompt pieces.
A new policy class with examples is tested here without a test written for it.
"""

from __future__ import annotations

import pytest

from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.policies.registry import POLICIES
from kvcache.cache.row_policy import policy_footprint
from tests.helpers import paged_llm, policy_cache_greedy, random_requests

BS = 16
PIECE = 16  # prompt pieces of a per-request store under max_num_batched_tokens=32
EXAMPLES = {text: name for name, cls in POLICIES.items() for text in cls.examples}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


def reference(model, policy: str, prompt: list[int], n: int) -> list[int]:
    plan = paged_plan(parse_policy(policy))
    if plan is None:
        return policy_cache_greedy(model, policy, prompt, n, piece=PIECE)
    if plan.evict is not None:
        return policy_cache_greedy(model, policy, prompt, n)  # the whole prompt, then compressed
    return policy_cache_greedy(model, policy, prompt, n, token_at_a_time=True)


def test_every_policy_declares_examples_that_parse():
    assert set(EXAMPLES.values()) == set(POLICIES)
    for text, name in EXAMPLES.items():
        spec = parse_policy(text)
        assert name in [p.name for p in (*spec.selectors, spec.store)], text


@pytest.mark.parametrize("policy", list(EXAMPLES))
def test_every_path_equals_the_one_sequence_reference(tiny_model_dir, policy):
    probe = paged_llm(tiny_model_dir, policy, blocks=256, max_num_batched_tokens=32)
    prompts, params = random_requests(probe.config.vocab_size, 8, 7, 20, lambda i: i % 2, (5, 50), (10, 30))
    longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
    plan = paged_plan(parse_policy(policy))
    if plan is None:  # blocks stand for the policy's packed bytes: a pool for about two requests
        fp = policy_footprint(probe.kv_policy, probe.config, probe.dtype, PIECE)
        blocks = -(-max(2 * fp.slots(longest // 2), fp.slots(longest + BS)) // BS)
    else:
        blocks = -(-longest // BS) + 2  # the longest request fits alone, not many at once
    llm = paged_llm(tiny_model_dir, policy, blocks=blocks, max_num_batched_tokens=32)
    outs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["preemptions"] > 0 and stats["blocks_used"] == 0, stats
    if plan is not None and plan.evict is None:
        assert stats["prefix_hits"] > 0, stats
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == reference(llm.model, policy, p, sp.max_tokens), (policy, p)
    for p, sp in list(zip(prompts, params))[:2]:  # alone on the engine
        assert probe.generate([p], sp)[0].token_ids == reference(llm.model, policy, p, sp.max_tokens)
