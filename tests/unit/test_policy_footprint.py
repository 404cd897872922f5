"""A store's bytes are what its class declares (`Policy.footprint`, `Policy.paged_token_bytes`):
a new store class is sized by its own declaration, with no edit anywhere else."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from kvcache.cache.policies import grammar, registry
from kvcache.cache.policies.footprint import PolicyFootprint
from kvcache.cache.policies.full import Full
from kvcache.cache.policies.params import Param
from kvcache.cache.policies.selectors import EVICT_UNIT
from kvcache.cache.row_policy import policy_footprint
from kvcache.engine.config import EngineConfig, bytes_per_token, dense_bytes_per_token, row_footprint
from kvcache.models.config import LlamaConfig

CONFIG = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=256)
CPU = torch.device("cpu")
DENSE = dense_bytes_per_token(CONFIG, torch.float32)


class Roomy(Full):
    """Holds tokens as `full` does, but declares `times` the bytes a token (a made-up store)."""

    name = "roomy"
    params: ClassVar[dict[str, Param]] = {"times": Param(int, 3, minimum=1), "paged": Param(int, 0, choices=(0, 1))}

    @classmethod
    def on_paged_blocks(cls, params: dict) -> bool:
        return params["paged"] == 1

    @classmethod
    def footprint(cls, part, config, dtype) -> PolicyFootprint:
        exact = dense_bytes_per_token(config, dtype)
        return PolicyFootprint(part.params["times"] * exact, 5 * exact, 7)

    @classmethod
    def paged_token_bytes(cls, part, config, dtype) -> int:
        return part.params["times"] * dense_bytes_per_token(config, dtype)


@pytest.fixture
def roomy(monkeypatch):
    """Register `Roomy` as the registry's import line would."""
    monkeypatch.setitem(registry.POLICIES, Roomy.name, Roomy)
    monkeypatch.setitem(grammar.POLICY_PARAMS, Roomy.name, Roomy.params)
    monkeypatch.setattr(grammar, "STORES", (*grammar.STORES, Roomy.name))
    monkeypatch.setattr(registry, "STORES", (*registry.STORES, Roomy.name))


def test_a_new_store_is_sized_by_its_declared_footprint(roomy):
    spec = grammar.parse_policy("roomy:times=4")
    assert policy_footprint(spec, CONFIG, torch.float32) == PolicyFootprint(4 * DENSE, 5 * DENSE, 7)
    assert bytes_per_token(spec, CONFIG, torch.float32) == 4 * DENSE
    cfg = EngineConfig.from_budget(spec, CONFIG, torch.float32, CPU, 256, memory=100 * 16 * 4 * DENSE)
    assert cfg.row_policy is spec and cfg.num_blocks == 100
    capped = EngineConfig.from_budget(spec, CONFIG, torch.float32, CPU, 256, max_num_seqs=2)
    assert capped.num_blocks == 2 * row_footprint(spec, CONFIG, torch.float32).slots(256 + 16) // 16


def test_its_selectors_bound_what_it_holds(roomy):
    spec = grammar.parse_policy("window:size=32+roomy")
    fp = policy_footprint(spec, CONFIG, torch.float32, prefill_piece=8)
    assert fp == PolicyFootprint(3 * DENSE, 5 * DENSE, 7, held_cap=32 + EVICT_UNIT + 8)
    assert fp.bytes_bound(10_000) == 7 * 5 * DENSE + (fp.held_cap - 7) * 3 * DENSE


def test_on_paged_blocks_a_token_takes_its_declared_bytes(roomy):
    spec = grammar.parse_policy("roomy:times=2,paged=1")
    assert row_footprint(spec, CONFIG, torch.float32) is None
    assert bytes_per_token(spec, CONFIG, torch.float32) == 2 * DENSE
    cfg = EngineConfig.from_budget(spec, CONFIG, torch.float32, CPU, 256, memory=10 * 16 * 2 * DENSE)
    assert cfg.num_blocks == 10 and cfg.row_policy is None and cfg.quant_format is None


def test_the_engine_runs_a_new_store_on_its_declared_rate(roomy, tiny_model_dir):
    import kvcache
    from tests.helpers import greedy

    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, kv_policy="roomy:times=2",
                      kv_cache_memory=1 << 20)
    per_token = 2 * dense_bytes_per_token(llm.config, torch.float32)
    assert llm.engine_bytes_per_token == per_token
    assert llm.engine.storage.bytes_per_token == per_token
    out = llm.generate([[5, 6, 7, 8]], greedy(4))[0]
    assert out.error is None and len(out.token_ids) == 4
