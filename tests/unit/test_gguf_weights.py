"""GGUF blocks kept packed: the block layouts, the repacking, and the header index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcache.errors import ModelFormatError
from kvcache.models import weight_packing as wp
from kvcache.models.gguf_weights import decode_blocks, gguf_state_dict, tensor_index
from tests.helpers import write_gguf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def test_q4_1_block_layout_by_hand():
    """One Q4_1 block: fp16 d, fp16 m, then byte i = weight i (low nibble) | weight 16+i (high)."""
    qs = np.array([i | ((15 - i) << 4) for i in range(16)], dtype=np.uint8)
    block = np.concatenate([np.array([0.5, -1.0], dtype="<f2").view(np.uint8), qs])[None]  # (1, 20)
    w = wp.dequantize(decode_blocks(block, "Q4_1"))[0]
    want = [0.5 * i - 1 for i in range(16)] + [0.5 * (15 - i) - 1 for i in range(16)]
    assert w.tolist() == want


def test_q4_0_and_q8_0_block_layouts_by_hand():
    qs = np.array([i | ((15 - i) << 4) for i in range(16)], dtype=np.uint8)
    block = np.concatenate([np.array([0.25], dtype="<f2").view(np.uint8), qs])[None]  # (1, 18)
    w = wp.dequantize(decode_blocks(block, "Q4_0"))[0]
    assert w.tolist() == [0.25 * (i - 8) for i in range(16)] + [0.25 * (7 - i) for i in range(16)]
    q8 = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([np.array([2.0], dtype="<f2").view(np.uint8), q8.view(np.uint8)])[None]  # (1, 34)
    assert wp.dequantize(decode_blocks(block, "Q8_0"))[0].tolist() == [2.0 * v for v in range(-16, 16)]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_repacked_blocks_dequantize_as_gguf_does(qtype):
    w = np.random.default_rng(0).standard_normal((37, 96)).astype(np.float32)  # 37 rows: a partial tile
    raw = gguf.quants.quantize(w, T[qtype])  # (37, 3 blocks * bytes)
    p = decode_blocks(raw, qtype)
    assert p.nbytes == 3 * wp.tile_bytes(p.fmt, 3)
    want = torch.from_numpy(gguf.quants.dequantize(raw, T[qtype]))
    assert torch.equal(wp.dequantize(p), want)


def test_index_and_state_dict_match_gguf_reader_and_undo_the_rope_permutation(tmp_path):
    from kvcache.models.gguf_file import unpermute_rope_rows

    rng = np.random.default_rng(1)
    tensors = {"token_embd.weight": (rng.standard_normal((50, 64)).astype(np.float32), "Q8_0"),
               "blk.0.attn_q.weight": (rng.standard_normal((64, 64)).astype(np.float32), "Q4_1"),
               "blk.0.attn_k.weight": (rng.standard_normal((32, 64)).astype(np.float32), "Q4_0"),
               "blk.0.attn_norm.weight": (rng.standard_normal(64).astype(np.float32), "F32"),
               "blk.0.ffn_down.weight": (rng.standard_normal((64, 96)).astype(np.float32), "F16")}
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tensors)
    reader = gguf.GGUFReader(str(path))
    index = tensor_index(path)
    assert [(e.name, e.type_name, e.offset) for e in index] == [
        (t.name, t.tensor_type.name, int(t.data_offset)) for t in reader.tensors]
    sd = gguf_state_dict(path, heads=4, kv_heads=2)
    by_name = {t.name: t for t in reader.tensors}

    def want(name, heads=None):
        t = by_name[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(unpermute_rope_rows(arr, heads) if heads else arr))

    assert torch.equal(wp.dequantize(sd["model.embed_tokens.weight"]), want("token_embd.weight"))
    assert torch.equal(wp.dequantize(sd["model.layers.0.self_attn.q_proj.weight"]), want("blk.0.attn_q.weight", 4))
    assert torch.equal(wp.dequantize(sd["model.layers.0.self_attn.k_proj.weight"]), want("blk.0.attn_k.weight", 2))
    assert torch.equal(sd["model.layers.0.input_layernorm.weight"], want("blk.0.attn_norm.weight"))
    assert torch.equal(sd["model.layers.0.mlp.down_proj.weight"], want("blk.0.ffn_down.weight"))
    assert sd["model.layers.0.self_attn.q_proj.weight"].source == "Q4_1"


def test_an_unsupported_tensor_type_names_it_and_the_supported_formats(tmp_path):
    path = tmp_path / "kq.gguf"
    write_gguf(path, {"blk.0.ffn_up.weight": (np.zeros((4, 256), np.float32), "Q2_K")})
    with pytest.raises(ModelFormatError) as err:
        gguf_state_dict(path, heads=4, kv_heads=2)
    msg = str(err.value)
    assert "blk.0.ffn_up.weight as Q2_K" in msg and "Q8_0, Q4_0, Q4_1" in msg and "\n" not in msg


def test_a_file_that_is_not_gguf_is_one_sentence(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelFormatError, match="is not a readable GGUF file"):
        tensor_index(path)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_requantized_formats_stay_within_their_kept_formats_step(qtype):
    """K-quants and the 5-bit formats are decoded by the gguf package and requantized: Q4_K into
    groups of 32 with scale and minimum (its sub-blocks), the rest into int8 per block of 32."""
    from tests.helpers import k_quant_blocks

    rows, cols = 37, 512  # a partial tile, two 256-weight super-blocks
    if qtype.endswith("_K"):
        raw = k_quant_blocks(rows, cols, qtype)
    else:
        raw = gguf.quants.quantize(np.random.default_rng(3).standard_normal((rows, cols)).astype(np.float32), T[qtype])
    p = decode_blocks(raw, qtype)
    want = torch.from_numpy(gguf.quants.dequantize(raw, T[qtype])).reshape(rows, cols)  # (N, K)
    assert p.source == qtype and p.fmt == ("q4" if qtype == "Q4_K" else "q8")
    groups = want.reshape(rows, -1, 32)
    spread = groups.amax(-1) - groups.amin(-1) if p.fmt == "q4" else 2 * groups.abs().amax(-1)  # (N, K/32)
    steps = 15 if p.fmt == "q4" else 254
    err = (wp.dequantize(p) - want).abs().reshape(rows, -1, 32).amax(-1)  # (N, K/32)
    fp16 = groups.abs().amax(-1) * 2 ** -9  # the fp16 scale and minimum's rounding, over 15 steps
    assert (err <= spread / steps / 2 + fp16 + 1e-6).all()  # half a step of the kept grid
    assert err.max() > 0 or p.fmt == "q4"  # a real requantization, not the reference handed back


def test_a_gguf_of_k_quants_loads_packed_and_close_to_its_float_weights(tmp_path):
    from kvcache.models.gguf_weights import keeps_packed

    rng = np.random.default_rng(4)
    tensors = {"blk.0.ffn_down.weight": (np.zeros((64, 512), np.float32), "Q6_K"),
               "blk.0.ffn_up.weight": (np.zeros((512, 256), np.float32), "Q4_K"),
               "blk.0.ffn_gate.weight": (np.zeros((512, 256), np.float32), "Q5_K"),
               "blk.0.attn_v.weight": (rng.standard_normal((32, 64)).astype(np.float32), "Q5_0")}
    path = tmp_path / "k.gguf"
    write_gguf(path, tensors)
    assert keeps_packed(path)
    sd = gguf_state_dict(path, 4, 2)
    assert {k: v.source for k, v in sd.items()} == {
        "model.layers.0.mlp.down_proj.weight": "Q6_K", "model.layers.0.mlp.up_proj.weight": "Q4_K",
        "model.layers.0.mlp.gate_proj.weight": "Q5_K", "model.layers.0.self_attn.v_proj.weight": "Q5_0"}


def test_a_gguf_that_scales_rope_by_frequency_factors_is_refused_on_every_load_path(tmp_path):
    from kvcache.models.gguf_convert import convert_gguf
    from kvcache.models.gguf_weights import check_types
    from tests.helpers import PACKED_SHAPE, write_tiny_packed_gguf

    head_dim = PACKED_SHAPE[-1]
    path = write_tiny_packed_gguf(tmp_path / "llama31.gguf",
                                  extra={"rope_freqs.weight": (np.ones(head_dim // 2, np.float32), "F32")})
    with pytest.raises(ModelFormatError, match="scales its RoPE by frequency factors"):
        check_types(path)  # quantization="gguf"
    with pytest.raises(ModelFormatError, match="scales its RoPE by frequency factors"):
        convert_gguf(path, tmp_path / "out", progress=False)  # none, int8, int4: the dequantized copy
    assert not (tmp_path / "out").exists()
