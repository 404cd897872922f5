"""The weight-bytes calculator against what `LlamaModel` holds once loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcache.errors import KVCacheError
from kvcache.models.config import LlamaConfig
from kvcache.models.gguf_weights import gguf_state_dict
from kvcache.models.llama import LlamaModel
from kvcache.models.weight_bytes import gguf_weight_bytes, weight_bytes
from tests.helpers import write_gguf, write_tiny_quantized_gguf


def config(tied: bool, intermediate: int = 96, vocab: int = 300) -> LlamaConfig:
    """2 layers, 4 query heads and 2 KV heads of 16; 300 rows of vocabulary end in a partial tile."""
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=intermediate, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=tied)


def random_state(c: LlamaConfig) -> dict:
    g = torch.Generator().manual_seed(0)
    h, q, kv, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    sd = {"model.embed_tokens.weight": torch.randn(c.vocab_size, h, generator=g), "model.norm.weight": torch.ones(h)}
    if not c.tie_word_embeddings:
        sd["lm_head.weight"] = torch.randn(c.vocab_size, h, generator=g)
    for n in range(c.num_layers):
        p = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, q)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            sd[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.05
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return sd


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_loaded_models_weight_bytes(tied, quantization, dtype):
    c = config(tied)
    model = LlamaModel.from_state_dict(c, random_state(c), dtype, quantization=quantization)
    assert weight_bytes(c, quantization, dtype.itemsize) == model.weight_bytes


def test_int8_of_inputs_not_a_multiple_of_32_counts_the_padding():
    c = config(tied=False, intermediate=80)  # down_proj has 80 inputs: 3 blocks, 16 of them zeros
    model = LlamaModel.from_state_dict(c, random_state(c), torch.float32, quantization="int8")
    assert weight_bytes(c, "int8", 4) == model.weight_bytes
    with pytest.raises(KVCacheError, match="down_proj has 80 inputs"):
        weight_bytes(c, "int4", 4)


def test_the_formulas_by_hand():
    c = config(tied=True)
    norms = 5 * 64 * 2
    # none: q, o 64x64; k, v 32x64; gate, up 96x64; down 64x96 per layer; embedding and head 300x64
    layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64
    assert weight_bytes(c, "none", 2) == norms + 2 * layer * 2 + 2 * 300 * 64 * 2
    # int4: q4 tiles of 16 rows x 320 bytes per block of 32 inputs; the tied table once, in q8
    # tiles of 544 bytes per block
    q4 = 2 * 4 * 2 * 320 + 2 * 2 * 2 * 320 + 2 * 6 * 2 * 320 + 4 * 3 * 320
    q8 = 19 * 2 * 544  # 300 rows: 19 tiles
    assert weight_bytes(c, "int4", 2) == norms + 2 * q4 + q8


def test_a_shape_without_vocab_or_intermediate_is_one_sentence():
    from kvcache.cache.spec import ModelShape

    shape = ModelShape("x", 2, 4, 2, 16, 64, 128)
    with pytest.raises(KVCacheError, match="vocab_size and intermediate_size"):
        weight_bytes(shape, "none")
    with pytest.raises(KVCacheError, match="not a GGUF"):
        weight_bytes(shape, "gguf")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_equals_the_loaded_models_weight_bytes(tmp_path, tied, dtype):
    """Packed Q8_0 / Q4_0 / Q4_1 matrices, a float matrix beside them, and a float or packed table."""
    pytest.importorskip("gguf")
    path = write_tiny_quantized_gguf(tmp_path / "tiny.gguf", tied)
    model = LlamaModel.from_state_dict(config(tied), gguf_state_dict(path, 4, 2), dtype, quantization="gguf")
    assert gguf_weight_bytes(path, dtype.itemsize) == model.weight_bytes
    assert weight_bytes(config(tied), "gguf", dtype.itemsize, gguf=path) == model.weight_bytes


def test_a_gguf_type_not_kept_is_one_sentence(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "kq.gguf"
    write_gguf(path, {"blk.0.ffn_up.weight": (np.zeros((4, 256), np.float32), "Q2_K")})
    with pytest.raises(KVCacheError, match="blk.0.ffn_up.weight as Q2_K"):
        gguf_weight_bytes(path)
