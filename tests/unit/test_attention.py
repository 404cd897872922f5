"""Every method of the native attention backend against the torch backend (the reference any
backend is held to) on small random shapes: ragged rows, scattered blocks, a partial last
block, left padding, attention sinks, quantized codes. The torch backend is itself checked
against attention written out by hand."""

from __future__ import annotations

import pytest
import torch

from kvcache.native import ops as native
from kvcache.cache.attention import NATIVE_CPU, TORCH, DecodeSinks, NativeCPUAttention, attention_backend
from kvcache.cache.paged_quant import PagedQuantizedStorage, TokenQuantFormat
from kvcache.cache.policies.quantized_store import QuantizedKVStore
from kvcache.models.rope import RotaryTable
from kvcache.models.step import causal_mask
from kvcache.native import build

needs_native = pytest.mark.skipif(not build.wanted(), reason="no C compiler on this machine, or KVCACHE_NATIVE=0")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=4e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query q (Hq, D) over k, v (Hkv, n, D), fp32: (Hq, D)."""
    g = q.shape[0] // k.shape[0]
    kf, vf = k.float().repeat_interleave(g, 0), v.float().repeat_interleave(g, 0)  # (Hq, n, D)
    p = ((q.float()[:, None] @ kf.transpose(-1, -2))[:, 0] * q.shape[-1] ** -0.5).softmax(-1)  # (Hq, n)
    return (p[:, None] @ vf)[:, 0]


def scattered(hkv: int, d: int, bs: int, lens: list[int], dtype, seed: int = 0):
    """Paged storage k, v (Hkv, slots, D), each row's blocks scattered: table (B, NB) int32."""
    gen = torch.Generator().manual_seed(seed)
    nb = max(-(-n // bs) for n in lens)
    nblocks = 3 * nb + 2
    k = torch.randn(hkv, nblocks * bs, d, generator=gen).to(dtype)
    v = torch.randn(hkv, nblocks * bs, d, generator=gen).to(dtype)
    table = torch.stack([torch.randperm(nblocks, generator=gen)[:nb] for _ in lens]).to(torch.int32)
    return k, v, table


def row_slots(table: torch.Tensor, r: int, bs: int, lo: int, hi: int) -> torch.Tensor:
    return torch.tensor([int(b) * bs + i for b in table[r] for i in range(bs)][lo:hi])


def test_the_backend_is_picked_from_dtype_device_and_the_model():
    built = native.supports(torch.float32, "cpu")
    assert attention_backend(torch.float32, "cpu") is (NATIVE_CPU if built else TORCH)
    assert attention_backend(torch.float32, "cpu", use_native=False) is TORCH
    assert attention_backend(torch.float16, "cpu") is TORCH
    assert attention_backend(torch.float32, "meta") is TORCH
    assert TORCH.reads_in_place is False and NATIVE_CPU.reads_in_place is True
    assert isinstance(NATIVE_CPU, NativeCPUAttention) and TORCH.name == "torch"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs,lens,lo", [
    (4, 2, 16, 4, [11, 3, 8], [0, 0, 5]),  # partial last blocks; a row starting past released slots
    (6, 2, 64, 8, [17, 40, 1], [0, 3, 0]),
    (3, 3, 32, 16, [5, 33], [0, 0]),
])
def test_paged_decode_over_scattered_blocks(dtype, hq, hkv, d, bs, lens, lo):
    k, v, table = scattered(hkv, d, bs, lens, dtype)
    q = torch.randn(len(lens), hq, d).to(dtype)
    lo_t, hi_t = torch.tensor(lo), torch.tensor(lens)
    want = TORCH.paged_decode(q, k, v, table, lo_t, hi_t, bs)  # (B, Hq, D)
    assert want.shape == q.shape and want.dtype == dtype
    for r in range(len(lens)):
        slots = row_slots(table, r, bs, lo[r], lens[r])
        torch.testing.assert_close(want[r].float(), by_hand(q[r], k[:, slots], v[:, slots]), **TOL[dtype])
    if build.wanted():
        torch.testing.assert_close(NATIVE_CPU.paged_decode(q, k, v, table, lo_t, hi_t, bs).float(), want.float(),
                                   **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_over_a_dense_cache_with_left_padding(dtype):
    """The dense layout (B, Hkv, cap, D), one block of the capacity per row, rows padded on the left."""
    b, hq, hkv, cap, d = 3, 4, 2, 12, 16
    k, v = torch.randn(b, hkv, cap, d).to(dtype), torch.randn(b, hkv, cap, d).to(dtype)
    q = torch.randn(b, hq, d).to(dtype)
    table, lo, hi = torch.zeros(b, 1, dtype=torch.int32), torch.tensor([0, 4, 9]), torch.full((b,), 10)
    want = TORCH.paged_decode(q, k, v, table, lo, hi, cap)
    for r in range(b):
        torch.testing.assert_close(want[r].float(), by_hand(q[r], k[r, :, lo[r]:10], v[r, :, lo[r]:10]), **TOL[dtype])
    if build.wanted():
        torch.testing.assert_close(NATIVE_CPU.paged_decode(q, k, v, table, lo, hi, cap).float(), want.float(),
                                   **TOL[dtype])


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq", [(16, 4), (64, 6)])
def test_paged_decode_with_sinks(dtype, d, hq):
    """Sink tokens score against the query rotated back by its row's shift; the gap is skipped."""
    hkv, bs = 2, 8
    lens = [29, 30, 13]
    k, v, table = scattered(hkv, d, bs, lens, dtype, seed=3)
    k = 3 * k
    q = torch.randn(3, hq, d).to(dtype)
    cos, sin = RotaryTable(d, 10000.0, None, 64, "cpu", dtype).lookup(torch.tensor([[5], [0], [17]]))  # (B, 1, 1, D)
    sinks = DecodeSinks(cos[:, 0, 0], -sin[:, 0, 0], torch.tensor([4, 2, 4]), torch.tensor([8, 8, 4]),
                        torch.arange(3))
    lo, hi = torch.zeros(3, dtype=torch.int64), torch.tensor(lens)
    want = TORCH.paged_decode(q, k, v, table, lo, hi, bs, sinks)
    got = NATIVE_CPU.paged_decode(q, k, v, table, lo, hi, bs, sinks)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    plain = TORCH.paged_decode(q, k, v, table, lo, hi, bs)
    assert not torch.allclose(plain.float(), want.float(), atol=1e-3)  # the sinks changed something


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("windowed", [False, True])
def test_causal_chunk(dtype, windowed):
    """A prompt chunk over its prefix and itself; bf16 takes the prefill kernel where it is
    built, a windowed mask always the masked path."""
    t, s, hq, hkv, d = 7, 19, 4, 2, 64
    q = torch.randn(1, t, hq, d).to(dtype).transpose(1, 2)  # (1, Hq, T, D), token-major like the model's
    k, v = torch.randn(1, hkv, s, d).to(dtype), torch.randn(1, hkv, s, d).to(dtype)
    mask = causal_mask(None, 1, s - t, t, "cpu")  # (1, 1, T, S)
    if windowed:
        mask = mask & (torch.arange(s)[None] >= torch.arange(t)[:, None] + 5)
    want = TORCH.causal_chunk(q, k, v, lambda: mask, not windowed)  # (1, T, Hq*D)
    for i in range(t):
        keys = mask[0, 0, i].nonzero()[:, 0]
        torch.testing.assert_close(want[0, i].view(hq, d).float(), by_hand(q[0, :, i], k[0][:, keys], v[0][:, keys]),
                                   **TOL[dtype])
    if build.wanted():
        got = NATIVE_CPU.causal_chunk(q, k, v, lambda: mask, not windowed)
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,key_group,value_group,rotate", [(8, 16, 16, False), (4, 8, 16, True), (2, 16, 8, True)])
def test_paged_quantized_decode(dtype, bits, key_group, value_group, rotate):
    hq, hkv, d, bs, nblocks = 4, 2, 16, 4, 12
    st = PagedQuantizedStorage(1, nblocks, bs, hkv, d, dtype, "cpu",
                               TokenQuantFormat(bits, key_group, value_group, rotate_values=rotate, rotate_keys=rotate))
    st.zero_blocks(range(nblocks))
    k, v = 3 * torch.randn(1, hkv, nblocks * bs, d), torch.randn(1, hkv, nblocks * bs, d)  # (1, Hkv, T, D)
    st.scatter(0, torch.arange(nblocks * bs), k.to(dtype), v.to(dtype))
    table = torch.tensor([[7, 2, 9], [0, 11, 3], [5, 0, 0]], dtype=torch.int32)
    lo, hi = torch.tensor([0, 5, 0]), torch.tensor([11, 9, 3])
    q = torch.randn(3, hq, d).to(dtype)
    want = TORCH.paged_quantized_decode(q, st.k.layer(0), st.v.layer(0), table, lo, hi, bs)
    keys, values = st.read_rows(0, table.long())  # (B, Hkv, 12, D), dequantized
    for r in range(3):
        torch.testing.assert_close(want[r].float(), by_hand(q[r], keys[r, :, lo[r]:hi[r]], values[r, :, lo[r]:hi[r]]),
                                   **TOL[dtype])
    got = NATIVE_CPU.paged_quantized_decode(q, st.k.layer(0), st.v.layer(0), table, lo, hi, bs)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@needs_native
@pytest.mark.parametrize("rotate", [False, True])
def test_quantized_decode_rows(rotate):
    """Sequences of different lengths (sinks, quantized groups, exact tails) in one call."""
    hkv, hq, d = 2, 4, 32
    gen = torch.Generator().manual_seed(7)
    rows, stores = [], []
    for n in (40, 75):
        store = QuantizedKVStore(1, hkv, d, 4, 16, 8, 2, torch.float32, torch.device("cpu"), rotate_values=rotate)
        store.append(0, torch.randn(1, hkv, n, d, generator=gen), torch.randn(1, hkv, n, d, generator=gen))
        store.advance(n)
        assert store.num_quantized > 0
        stores.append(store)
        rows.append(store.attend_inputs(0, 0))
    q = torch.randn(2, hq, d, generator=gen)
    want = TORCH.quantized_decode_rows(q, rows)  # (B, Hq, D)
    for r, store in enumerate(stores):
        k, v = store.read(0, 0)  # (1, Hkv, S, D) dequantized
        torch.testing.assert_close(want[r], by_hand(q[r], k[0], v[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(NATIVE_CPU.quantized_decode_rows(q, rows), want, rtol=1e-5, atol=1e-5)
