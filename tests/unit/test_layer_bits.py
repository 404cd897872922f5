"""Mixed precision by layer: `hi_keys` / `hi_values` / `hi_bits` of the quantized policies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.policies.quantized_store import QuantizedKVStore, layer_bits
from kvcache.cache.policies.registry import POLICIES
from kvcache.cache.quant import LayerBitsBuffer, QuantizedBuffer, dequantize, layer_store, quantize
from kvcache.cache.spec import kv_layers_bytes
from kvcache.errors import KVCacheError

BITS = (2, 4, 2, 8)  # a width per layer
H, D = 3, 16


def _x(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_each_layer_is_stored_at_its_own_width(axis):
    store = LayerBitsBuffer(BITS, 1, H, D, 4, axis)
    x = _x(0, (len(BITS), 1, H, 8, D))  # (L, B, Hkv, T, D)
    store.append_all(x)
    for i, b in enumerate(BITS):
        q = store.view(i)
        assert q.bits == b and q.data.shape[-1] == D * b // 8  # really packed at b bits
        out = torch.empty(1, H, 8, D)
        assert store.dequantize_into(i, out) == 8
        assert torch.equal(out, dequantize(quantize(x[i], b, 4, axis)))


def test_wider_layers_have_smaller_error():
    store = LayerBitsBuffer(BITS, 1, H, D, 4, "token")
    x = _x(1, (1, 1, H, 32, D)).expand(len(BITS), 1, H, 32, D)  # the same tokens in every layer
    store.append_all(x)
    err = {b: (dequantize(store.view(i)) - x[i]).abs().max().item() for i, b in enumerate(BITS)}
    assert err[8] < err[4] < err[2]


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_nbytes_equals_the_calculator(axis):
    store = LayerBitsBuffer(BITS, 2, H, D, 4, axis, capacity_tokens=16)
    for i in range(len(BITS)):
        store.append(i, _x(i, (2, H, 4 * (i + 1), D)))
    per_layer = [kv_layers_bytes((b,), 4, 4 * (i + 1), H, D, axis, batch=2) for i, b in enumerate(BITS)]
    assert store.nbytes == sum(per_layer) > 0
    store.truncate(4)
    assert store.nbytes == kv_layers_bytes(BITS, 4, 4, H, D, axis, batch=2)
    store.drop_front(4)
    assert store.nbytes == 0 and store.num_tokens(3) == 0


def test_uniform_widths_give_the_plain_store():
    assert isinstance(layer_store((4, 4), 1, H, D, 4, "token"), QuantizedBuffer)
    mixed = layer_store((4, 2), 1, H, D, 4, "token")
    assert isinstance(mixed, LayerBitsBuffer) and mixed.layer_bits == (4, 2)
    with pytest.raises(KVCacheError, match="layer must be in"):
        mixed.view(2)


def _config(layers: int = 4):
    return SimpleNamespace(num_layers=layers, num_kv_heads=H, head_dim=D)


def test_policy_keys_set_the_widths_per_layer():
    part = parse_policy("quantized:bits=2,hi_keys=3/0/3,hi_values=1,hi_bits=8").store
    assert part.params["hi_keys"] == "0/3"  # sorted, no repeats
    assert layer_bits(part, 4) == ((8, 2, 2, 8), (2, 8, 2, 2))
    store = POLICIES["quantized"].make_store(part, _config(), torch.float32, torch.device("cpu"), 16)
    assert [store.qk.view(i).bits for i in range(4)] == [8, 2, 2, 8]
    assert [store.qv.view(i).bits for i in range(4)] == [2, 8, 2, 2]
    assert layer_bits(parse_policy("quantized:bits=4").store, 2) == ((4, 4), (4, 4))


@pytest.mark.parametrize("text, words", [
    ("quantized:bits=2,hi_keys=a/1", ["not a valid layer list", "0/1/29"]),
    ("quantized:bits=2,hi_keys=-1", ["not a valid layer list"]),
    ("quantized:bits=2,hi_values=1,hi_bits=2", ["hi_bits must be one of 8, 4"]),
    ("quantized:bits=4,hi_values=1,hi_bits=4", ["hi_bits (4) must be above", "4 bits"]),
    ("tiered:warm_bits=8,hi_keys=0", ["hi_bits (4) must be above", "8 bits"]),
])
def test_bad_layer_keys_are_one_clear_error(text, words):
    with pytest.raises(KVCacheError) as err:
        parse_policy(text)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_layer_past_the_model_is_refused():
    part = parse_policy("quantized:bits=2,hi_keys=0/4").store
    with pytest.raises(KVCacheError, match="hi_keys names layer 4, but the model's layers are 0 to 3"):
        POLICIES["quantized"].make_store(part, _config(), torch.float32, torch.device("cpu"), 16)


def _filled_store(rotate: bool) -> QuantizedKVStore:
    store = QuantizedKVStore(2, H, 64, 2, 16, 8, 2, torch.float32, torch.device("cpu"), clip=True,
                             rotate_values=rotate, key_bits=(4, 2), value_bits=(2, 8))
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):  # 5 chunks of 12 tokens: sinks, quantized groups, exact tail
        for layer in range(2):
            store.append(layer, torch.randn(1, H, 12, 64, generator=gen), torch.randn(1, H, 12, 64, generator=gen))
        store.advance(12)
    assert store.num_quantized > 0
    return store


@pytest.mark.parametrize("rotate", [False, True])
def test_decode_attention_from_codes_reads_each_layer_at_its_width(rotate):
    """The native kernel and the torch fallback both equal attention over the dequantized layer."""
    from kvcache.cache.attention import TORCH, attention_backend

    store = _filled_store(rotate)
    q = torch.randn(1, 2 * H, 1, 64, generator=torch.Generator().manual_seed(6))  # (1, Hq, 1, D)
    for layer in range(2):
        k, v = store.read(layer, 0)  # (1, Hkv, S, D)
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))  # (1, Hq, S, D)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (1, Hq, 1, D)
        want = want.transpose(1, 2).reshape(1, 1, -1)  # (1, 1, Hq*D)
        for backend in (attention_backend(torch.float32, "cpu"), TORCH):  # native where built, and torch
            got = backend.quantized_decode_rows(q.reshape(1, 2 * H, 64), [store.attend_inputs(layer, 0)])
            torch.testing.assert_close(got.view(1, 1, -1), want, rtol=1e-5, atol=1e-5)


def test_quantized_kv_store_bytes_equal_the_calculator():
    store = _filled_store(False)
    nq, exact = store.num_quantized, store.sinks.length + store.tail.length
    quant = (kv_layers_bytes((4, 2), 16, nq, H, 64, "channel") + kv_layers_bytes((2, 8), 16, nq, H, 64, "token"))
    assert store.nbytes == quant + exact * 2 * 2 * H * 64 * 4  # exact fp32 K and V, 2 layers
