"""The Triton attention backend against the torch reference, without a GPU: the kernels run on
CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is
imported). Small shapes (the interpreter is slow): ragged rows, shuffled scattered blocks,
partial last blocks, rows starting past released tokens, GQA, attention sinks, per-token
quantized codes, prompt chunks over cached blocks with a moving window, and the engine
generating the same greedy tokens with either backend.

KVCACHE_TEST_DEVICE=cuda (scripts/gpu_check.sh) runs the same checks compiled on a GPU instead:
no interpreter, tensors on CUDA, bf16 products on tensor cores."""

from __future__ import annotations

import os

DEV = os.environ.get("KVCACHE_TEST_DEVICE", "cpu")
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported (its kernels read it when defined)

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from kvcache.cache.attention import TORCH, DecodeSinks  # noqa: E402
from kvcache.cache.paged_quant import PagedQuantizedStorage, TokenQuantFormat  # noqa: E402
from kvcache.cache.triton_attention import TritonAttention  # noqa: E402
from kvcache.models.rope import RotaryTable  # noqa: E402

from tests.helpers import greedy, paged_llm  # noqa: E402

TRITON = TritonAttention()
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=4e-2)}


def scattered(hkv: int, d: int, bs: int, nb: int, rows: int, dtype, seed: int):
    """Storage k, v (Hkv, slots, D) of 3 * nb + 2 blocks and a table (rows, nb) int32 of
    shuffled, non-contiguous block ids (each row its own permutation)."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = 3 * nb + 2
    k = (2 * torch.randn(hkv, nblocks * bs, d, generator=gen)).to(dtype)
    v = torch.randn(hkv, nblocks * bs, d, generator=gen).to(dtype)
    table = torch.stack([torch.randperm(nblocks, generator=gen)[:nb] for _ in range(rows)]).to(torch.int32)
    return k.to(DEV), v.to(DEV), table.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs,lens,lo", [
    (6, 2, 32, 4, [11, 3, 45], [0, 0, 9]),  # GQA 3; partial last blocks; a row past released tokens
    (4, 4, 16, 16, [17, 40], [0, 16]),  # no grouping; tokens in two 32-token tiles
])
def test_paged_decode(dtype, hq, hkv, d, bs, lens, lo):
    nb = max(-(-n // bs) for n in lens)
    k, v, table = scattered(hkv, d, bs, nb, len(lens), dtype, seed=1)
    q = torch.randn(len(lens), hq, d).to(DEV, dtype)
    lo_t, hi_t = torch.tensor(lo, device=DEV), torch.tensor(lens, device=DEV)
    got = TRITON.paged_decode(q, k, v, table, lo_t, hi_t, bs)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), TORCH.paged_decode(q, k, v, table, lo_t, hi_t, bs).float(), **TOL[dtype])


def test_paged_decode_over_a_dense_cache_with_left_padding():
    """The dense layout (B, Hkv, cap, D): one block of the capacity per row (a row stride)."""
    b, hq, hkv, cap, d = 3, 4, 2, 40, 16
    k, v, q = (torch.randn(*shape, device=DEV) for shape in ((b, hkv, cap, d), (b, hkv, cap, d), (b, hq, d)))
    table, lo = torch.zeros(b, 1, dtype=torch.int32, device=DEV), torch.tensor([0, 4, 30], device=DEV)
    hi = torch.full((b,), 37, device=DEV)
    torch.testing.assert_close(TRITON.paged_decode(q, k, v, table, lo, hi, cap),
                               TORCH.paged_decode(q, k, v, table, lo, hi, cap), **TOL[torch.float32])


def test_paged_decode_with_sinks():
    """Sink tokens score against the query rotated back by the row's shift; the rest of the
    sinks' block (the gap) is skipped."""
    hq, hkv, d, bs = 4, 2, 16, 8
    lens = [29, 40]
    k, v, table = scattered(hkv, d, bs, 5, 2, torch.float32, seed=3)
    q = torch.randn(hq, 2, d, device=DEV).transpose(0, 1)  # (B, Hq, D) head-major in memory, as the model's are
    rope = RotaryTable(d, 10000.0, None, 64, DEV, torch.float32)
    cos, sin = rope.lookup(torch.tensor([[5], [17]], device=DEV))  # (B, 1, 1, D)
    sinks = DecodeSinks(cos[:, 0, 0], -sin[:, 0, 0], torch.tensor([4, 2], device=DEV), torch.tensor([8, 16], device=DEV),
                        torch.arange(2, device=DEV))
    lo, hi = torch.zeros(2, dtype=torch.int64, device=DEV), torch.tensor(lens, device=DEV)
    want = TORCH.paged_decode(q, k, v, table, lo, hi, bs, sinks)
    torch.testing.assert_close(TRITON.paged_decode(q, k, v, table, lo, hi, bs, sinks), want, **TOL[torch.float32])
    assert not torch.allclose(TORCH.paged_decode(q, k, v, table, lo, hi, bs), want, atol=1e-3)  # sinks matter


def quantized_storage(bits: int, key_group: int, value_group: int, rotate: bool, hkv: int, d: int, bs: int,
                      nblocks: int, dtype) -> PagedQuantizedStorage:
    """A one-layer pool of per-token codes, every slot written from random K/V."""
    st = PagedQuantizedStorage(1, nblocks, bs, hkv, d, dtype, DEV,
                               TokenQuantFormat(bits, key_group, value_group, rotate_values=rotate, rotate_keys=rotate),
                               attention=TRITON)
    st.zero_blocks(range(nblocks))
    gen = torch.Generator().manual_seed(bits)
    k, v = 3 * torch.randn(1, hkv, nblocks * bs, d, generator=gen), torch.randn(1, hkv, nblocks * bs, d, generator=gen)
    st.scatter(0, torch.arange(nblocks * bs, device=DEV), k.to(DEV, dtype), v.to(DEV, dtype))
    return st


@pytest.mark.parametrize("dtype,bits,key_group,value_group,rotate", [
    (torch.float32, 8, 16, 16, False), (torch.bfloat16, 4, 8, 16, True), (torch.float32, 2, 16, 8, True)])
def test_paged_quantized_decode(dtype, bits, key_group, value_group, rotate):
    """From the packed codes of 8, 4 and 2 bits, scales per group of channels, Hadamard-rotated K/V."""
    hq, hkv, d, bs = 4, 2, 16, 4
    st = quantized_storage(bits, key_group, value_group, rotate, hkv, d, bs, 12, dtype)
    table = torch.tensor([[7, 2, 9, 4], [0, 11, 3, 1], [5, 0, 0, 0]], dtype=torch.int32, device=DEV)
    lo, hi = torch.tensor([0, 5, 0], device=DEV), torch.tensor([15, 9, 3], device=DEV)
    q = torch.randn(3, hq, d).to(DEV, dtype)
    k, v = st.k.layer(0), st.v.layer(0)
    got = TRITON.paged_quantized_decode(q, k, v, table, lo, hi, bs)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), TORCH.paged_quantized_decode(q, k, v, table, lo, hi, bs).float(),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("windowed", [False, True])
def test_paged_chunk_over_cached_blocks(dtype, windowed):
    """A 13-token chunk at the end of 38 tokens (25 cached), over shuffled blocks; under a window
    each query sees from its own floor on. 13 x 3 folded rows span three query tiles."""
    hq, hkv, d, bs, t, n = 6, 2, 32, 4, 13, 38
    k, v, table = scattered(hkv, d, bs, -(-n // bs), 1, dtype, seed=5)
    q = torch.randn(1, t, hq, d).to(DEV, dtype).transpose(1, 2)  # (1, Hq, T, D) token-major like the model's
    floor = torch.arange(t, device=DEV) + 12 if windowed else None
    got = TRITON.paged_chunk(q, k, v, table, n, bs, floor)
    assert got.shape == (1, t, hq * d)
    torch.testing.assert_close(got.float(), TORCH.paged_chunk(q, k, v, table, n, bs, floor).float(), **TOL[dtype])


def test_causal_chunk_over_k_v_in_hand():
    t, s, hq, hkv, d = 7, 19, 4, 2, 16
    q = torch.randn(1, t, hq, d, device=DEV).transpose(1, 2)  # (1, Hq, T, D)
    k, v = torch.randn(1, hkv, s, d, device=DEV), torch.randn(1, hkv, s, d, device=DEV)
    mask = torch.ones(1, 1, t, s, dtype=torch.bool, device=DEV).tril(s - t)
    torch.testing.assert_close(TRITON.causal_chunk(q, k, v, lambda: mask, True),
                               TORCH.causal_chunk(q, k, v, lambda: mask, True), **TOL[torch.float32])


def test_paged_quantized_chunk():
    hq, hkv, d, bs, t, n = 4, 2, 16, 4, 6, 21
    st = quantized_storage(4, 16, 8, True, hkv, d, bs, 12, torch.float32)
    table = torch.tensor([[9, 3, 11, 0, 6, 2]], dtype=torch.int32, device=DEV)
    q = torch.randn(1, t, hq, d, device=DEV).transpose(1, 2)
    k, v = st.k.layer(0), st.v.layer(0)
    torch.testing.assert_close(TRITON.paged_quantized_chunk(q, k, v, table, n, bs),
                               TORCH.paged_quantized_chunk(q, k, v, table, n, bs), **TOL[torch.float32])


@pytest.mark.skipif(DEV != "cpu", reason="the tiny engine runs on the CPU")
@pytest.mark.parametrize("policy", [None, "quantized:bits=8,key_axis=token,residual=0", "sinks:n_sink=4,window=16"])
def test_engine_generates_the_same_tokens_with_either_backend(tiny_model_dir, policy):
    """The engine on 4-token blocks: decode rows in place, prompt chunks through their tables
    (a mixed step), sinks decode rows: Triton's greedy tokens are the torch backend's."""
    prompts = [[5 + i for i in range(n)] for n in (13, 6, 22)]

    def run(backend):
        llm = paged_llm(tiny_model_dir, policy or "full", blocks=40, block_size=4, max_num_batched_tokens=16)
        llm.engine.storage.attention = backend
        return [o.token_ids for o in llm.generate(prompts, greedy(6))]

    assert run(TRITON) == run(TORCH)


@pytest.mark.skipif(DEV != "cpu", reason="checks the CPU-side choice")
def test_triton_is_picked_on_cuda_only_and_imported_only_then(monkeypatch):
    import subprocess
    import sys

    from kvcache.cache.attention import NATIVE_CPU, attention_backend

    assert isinstance(attention_backend(torch.bfloat16, "cuda"), TritonAttention)
    assert attention_backend(torch.float32, "cpu") in (NATIVE_CPU, TORCH)
    monkeypatch.setenv("KVCACHE_TRITON", "0")
    assert attention_backend(torch.bfloat16, "cuda") is TORCH
    code = ("import sys, kvcache, kvcache.engine.engine, kvcache.cli, kvcache.server; "
            "sys.exit('triton' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVCACHE_TRITON": "1"}).returncode == 0
