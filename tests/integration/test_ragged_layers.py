"""A scorer may keep a different number of tokens in each layer (`Scorer.layer_targets`,
`ragged_layers`): the per-request store then holds a length per layer, each layer attends over
its own keys, the bytes follow the per-layer counts, and the paged engine hands such a policy a
per-request store. Tested here on SnapKV made ragged for the test, so no particular scorer is needed."""

from __future__ import annotations

import pytest
import torch

from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.cache import SequenceCache
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.policies.scorers.snapkv import SnapKV
from kvcache.cache.policies.selectors import EVICT_UNIT
from kvcache.cache.row_policy import policy_footprint
from kvcache.errors import KVCacheError
from tests.helpers import feed, paged_llm, policy_cache_greedy, random_requests


def spread(self, target: int, num_layers: int) -> list[int]:
    """Layer 0 keeps half as much again as the target, the last layer half (the tiny model has two)."""
    return [target + target // 2, target - target // 2]


@pytest.fixture
def ragged_snapkv(monkeypatch):
    monkeypatch.setattr(SnapKV, "ragged_layers", True)
    monkeypatch.setattr(SnapKV, "layer_targets", spread)


def test_each_layer_keeps_its_own_number_and_attends_over_its_own_keys(tiny_llm, ragged_snapkv):
    model = tiny_llm.model
    ids = torch.randint(0, model.config.vocab_size, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    policy = "evict:scorer=snapkv,ratio=0.5,window=8"
    cache = SequenceCache(model, policy)
    feed(model, cache, ids[:40], chunk=40)  # compressed after the chunk: 20 kept on average
    assert cache.layer_lengths == [30, 10] and cache.length == 30
    c = model.config
    assert cache.nbytes_used == 40 * 2 * c.num_kv_heads * c.head_dim * 4  # float32 K and V of 30 + 10 tokens
    assert cache.stats()["kept"] == 20 and cache.stats()["evicted"] == 20
    # the next tokens as one chunk (each layer's causal mask ends at its own keys) or one at a time
    # (no mask; no eviction after single tokens) see the same keys
    twin = SequenceCache(model, policy)
    feed(model, twin, ids[:40], chunk=40)
    chunked = feed(model, cache, ids[40:52], chunk=12)
    single = feed(model, twin, ids[40:52], chunk=1)
    assert torch.allclose(chunked, single, atol=1e-4)
    assert cache.layer_lengths == [39, 13] and twin.layer_lengths == [42, 22]  # 26 of 52 on average


def test_a_ragged_scorer_runs_alone_on_a_store_with_a_length_per_layer(ragged_snapkv):
    spec = parse_policy("evict:scorer=snapkv,ratio=0.5,window=8")
    assert paged_plan(spec) is None  # the paged engine gives it per-request stores
    assert paged_plan(parse_policy("evict:scorer=h2o,ratio=0.5,window=8")) is not None
    for text in ("sinks:n_sink=4,window=32+evict:scorer=snapkv,ratio=0.5",
                 "evict:scorer=snapkv,ratio=0.5+quantized:bits=4"):
        with pytest.raises(KVCacheError, match=r"different number of tokens in each layer.*\(full\)\.$"):
            parse_policy(text)


def test_the_footprint_counts_the_layers_on_average(ragged_snapkv, monkeypatch, tiny_llm):
    c, dtype = tiny_llm.model.config, torch.float32
    spec = parse_policy("evict:scorer=snapkv,budget=40,decode=true")
    assert policy_footprint(spec, c, dtype).held_cap == 40 + EVICT_UNIT  # 60 and 20: 40 on average
    monkeypatch.setattr(SnapKV, "layer_targets", lambda self, target, n: [target + 9, target])
    assert policy_footprint(spec, c, dtype).held_cap == 45 + EVICT_UNIT  # 49 and 40, rounded up


def test_the_engine_runs_a_ragged_scorer_on_per_request_stores(tiny_model_dir, ragged_snapkv):
    policy = "evict:scorer=snapkv,budget=24,window=8,decode=true"
    llm = paged_llm(tiny_model_dir, policy, blocks=64, max_num_batched_tokens=32)
    prompts, params = random_requests(llm.config.vocab_size, 4, 11, 0, lambda i: False, (30, 60), (10, 20))
    outs = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, outs):
        assert out.token_ids == policy_cache_greedy(llm.model, policy, p, sp.max_tokens, piece=16)
