"""`EngineConfig.from_budget`: a KV byte budget -> paged blocks, from the model shape and the policy (no model)."""

from __future__ import annotations

import pytest
import torch

from kvcache.cache.policies.grammar import parse_policy
from kvcache.engine.config import (EngineConfig, available_memory_bytes, bytes_per_token, dense_bytes_per_token,
                                   windowed_live_tokens)
from kvcache.errors import KVCacheError
from kvcache.models.config import LlamaConfig

CONFIG = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=256)
CPU = torch.device("cpu")
FP32_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head_dim x 4 bytes


def sized(policy: str | None = None, **kw) -> EngineConfig:
    return EngineConfig.from_budget(parse_policy(policy), CONFIG, torch.float32, CPU, 256, **kw)


def test_a_memory_budget_holds_whole_blocks():
    assert dense_bytes_per_token(CONFIG, torch.float32) == FP32_TOKEN
    cfg = sized(memory=10 * 16 * FP32_TOKEN + 100, block_size=16)
    assert cfg.num_blocks == 10
    assert sized(memory="40KiB", block_size=8).num_blocks == 40 * 1024 // (8 * FP32_TOKEN)
    assert cfg.row_policy is None and cfg.quant_format is None and cfg.sliding_window is None


def test_a_fraction_is_capped_at_what_every_sequence_at_full_length_needs():
    cfg = sized(max_num_seqs=3, block_size=16)  # 25% of available memory is far more than this
    assert cfg.num_blocks == 3 * (256 + 16) // 16


def test_a_window_bounds_what_a_sequence_holds():
    cfg = sized("window:size=64", max_num_seqs=2, block_size=16, max_num_batched_tokens=32)
    assert cfg.sliding_window == 64 and cfg.sink_tokens is None
    assert cfg.num_blocks == 2 * windowed_live_tokens(64, 0, 16, 32) // 16
    sinks = sized("sinks:n_sink=4,window=64", max_num_seqs=2, block_size=16, max_num_batched_tokens=32)
    assert (sinks.sink_tokens, sinks.sliding_window) == (4, 64)


def test_the_policy_sets_the_bytes_of_a_token():
    quant = parse_policy("quantized:bits=8,key_axis=token,residual=0")
    assert bytes_per_token(quant, CONFIG, torch.float32) < FP32_TOKEN
    cfg = sized("quantized:bits=8,key_axis=token,residual=0", memory=64 * 1024)
    assert cfg.quant_format is not None and cfg.row_policy is None
    assert cfg.num_blocks == 64 * 1024 // (16 * bytes_per_token(quant, CONFIG, torch.float32))
    rows = sized("quantized:bits=4", memory=64 * 1024)  # KIVI: a per-request cache, blocks as byte accounting
    assert rows.row_policy is not None and rows.row_policy.text == "quantized:bits=4"
    assert sized("evict:budget=64", memory=64 * 1024).evict is not None


@pytest.mark.parametrize("kw, message", [
    ({"block_size": 0}, "must be positive"),
    ({"max_num_seqs": -1}, "must be positive"),
    ({"memory": 1 << 20, "fraction": 0.1}, "not both"),
    ({"fraction": 0.95}, "kv_cache_fraction must be in"),
    ({"memory": 100}, "holds no 16-token block"),
    ({"memory": "lots"}, "lots"),
])
def test_bad_sizes_are_one_sentence(kw, message):
    with pytest.raises(KVCacheError, match=message):
        sized(**kw)


def test_a_budget_over_the_available_memory_is_refused():
    with pytest.raises(KVCacheError, match="more than the"):
        sized(memory=available_memory_bytes(CPU) * 4)
