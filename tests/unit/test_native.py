"""The native decode kernels against the torch ops they replace, and the model with and without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvcache.native import ops as native
from kvcache.cache.dense import KVCache
from kvcache.native import build
from kvcache.models.sdpa import grouped_sdpa as attend
from kvcache.models.rope import apply_rotary

pytestmark = pytest.mark.skipif(not build.wanted(), reason="no C compiler on this machine, or KVCACHE_NATIVE=0")


@pytest.fixture(scope="module", autouse=True)
def _kernels_built():
    """With a compiler at hand the kernels must build: a compile error fails every test here
    with the compiler's message (it is not a machine without native kernels)."""
    try:
        build.build()
        failure = None
    except build.BuildError as exc:
        failure = str(exc)
    if failure:
        pytest.fail(failure, pytrace=False)
    assert native.supports(torch.float32, "cpu"), "the kernels built but did not load (see the warning above)"

# fp32 math in both; bf16 output rounded once (half an ulp of values around 1-8 is <= 2^-6)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=4e-2)}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    x, w = torch.randn(3, 5, 96).to(dtype), torch.rand(96).to(dtype) + 0.5
    want = F.rms_norm(x.float(), (96,), w.float(), 1e-6)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-6).float(), want, **TOL[dtype])
    if dtype == torch.float32:  # one pass of fp32 math: equal to torch's to a few ulps
        torch.testing.assert_close(native.rms_norm(x, w, 1e-6), F.rms_norm(x, (96,), w, 1e-6), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gu = (3 * torch.randn(4, 2, 2 * 40)).to(dtype)
    gate, up = gu.float().chunk(2, -1)
    torch.testing.assert_close(native.silu_mul(gu).float(), F.silu(gate) * up, **TOL[dtype])


def test_silu_mul_bf16_rounds_the_fp32_result_to_nearest_even():
    gu = (3 * torch.randn(5, 2 * 37)).to(torch.bfloat16)  # 37: two 16-lane vectors and a scalar tail
    want = native.silu_mul(gu.float()).to(torch.bfloat16)  # the same fp32 math, rounded by torch
    assert torch.equal(native.silu_mul(gu).view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 15, 16, 49, 1000])
def test_argmax_rows_equals_torch_with_ties_and_nan(dtype, n):
    x = torch.randn(6, n).to(dtype)
    x[1] = x[1].round()  # many ties: the first index wins
    x[2] = -torch.inf
    x[3, n // 2] = torch.nan  # NaN counts as the largest
    x[4, -1] = 1e4  # the largest in the scalar tail
    x[5, : n // 2 + 1] = 1e4  # a tie between the vector part and the tail
    assert torch.equal(native.argmax_rows(x), x.argmax(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,prefix,hq,hkv", [(1, 0, 9, 3), (5, 3, 9, 3), (16, 0, 4, 4), (37, 21, 9, 3), (70, 0, 8, 2)])
def test_prefill_attention_equals_causal_sdpa(dtype, t, prefix, hq, hkv):
    from kvcache.models.step import causal_mask

    s = prefix + t
    qkv = torch.randn(1, t, hq + 2 * hkv, 64).to(dtype)  # the fused projection's layout, read in place
    q = qkv[:, :, :hq].transpose(1, 2)  # (1, Hq, T, D), not contiguous
    k, v = torch.randn(1, hkv, s, 64).to(dtype), torch.randn(1, hkv, s, 64).to(dtype)
    if not native.prefill_attention_fits(q, k):
        pytest.skip("the native prefill kernel needs an AVX-512 build")
    want = attend(q.float(), k.float(), v.float(), causal_mask(None, 1, prefix, t, "cpu"))  # (1, T, Hq*D)
    torch.testing.assert_close(native.prefill_attention(q, k, v).float(), want, **TOL[dtype])


def test_prefill_attention_refuses_what_it_cannot_read():
    q = torch.randn(1, 9, 4, 64)  # (1, Hq, T, D) contiguous: a token's heads are not side by side
    assert not native.prefill_attention_fits(q, torch.randn(1, 3, 4, 64))
    q = torch.randn(1, 4, 9, 32).transpose(1, 2)  # head_dim 32
    assert not native.prefill_attention_fits(q, torch.randn(1, 3, 4, 32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rot", [6, 4])  # Q and K heads / Q heads only (the cache rotates keys)
def test_rotary_in_place_rotates_only_the_first_heads(dtype, n_rot):
    x = torch.randn(2, 3, 8, 16).to(dtype)  # (B, T, heads, D)
    cos, sin = torch.randn(50, 16).to(dtype), torch.randn(50, 16).to(dtype)
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]])
    want = apply_rotary(x[:, :, :n_rot].float(), cos.float()[pos][:, :, None], sin.float()[pos][:, :, None])
    y = x.clone()
    native.rotary_(y, cos, sin, pos.reshape(-1).contiguous(), n_rot)
    torch.testing.assert_close(y[:, :, :n_rot].float(), want, **TOL[dtype])
    assert torch.equal(y[:, :, n_rot:], x[:, :, n_rot:])
    if dtype == torch.float32:  # same two roundings as torch's mul, mul, add
        assert torch.equal(y[:, :, :n_rot], apply_rotary(x[:, :, :n_rot], cos[pos][:, :, None], sin[pos][:, :, None]))


def reference_attention(q, keys, values):
    """q (Hq, D), keys/values (Hkv, S, D): SDPA with the KV heads repeated for their query group."""
    g = q.shape[0] // keys.shape[0]
    k, v = keys.float().repeat_interleave(g, 0), values.float().repeat_interleave(g, 0)
    return F.scaled_dot_product_attention(q.float()[:, None], k, v)[:, 0]  # (Hq, D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_dense_rows_with_left_padding(dtype):
    b, hq, hkv, cap, d = 3, 6, 2, 40, 16
    k, v = torch.randn(b, hkv, cap, d).to(dtype), torch.randn(b, hkv, cap, d).to(dtype)
    q = torch.randn(b, hq, d).to(dtype)
    lo, hi = torch.tensor([0, 7, 29]), torch.tensor([30, 30, 30])
    out = native.decode_attention(q, k, v, torch.zeros(b, 1, dtype=torch.int32), lo, hi, hkv, cap,
                                  hkv * cap * d, cap * d)
    for r in range(b):
        want = reference_attention(q[r], k[r, :, lo[r]:hi[r]], v[r, :, lo[r]:hi[r]])
        torch.testing.assert_close(out[r].float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs,lens", [
    (4, 2, 8, 4, [11, 9, 3]),
    # head_dim 64 takes the vector task body (AVX-512 or AVX2): G = 3, 1, 4 and 5 (the generic
    # G), runs not a multiple of four keys, more tokens than one 256-token chunk
    (9, 3, 64, 16, [300, 37, 5]),
    (2, 2, 64, 16, [70, 3, 18]),
    (8, 2, 64, 8, [41, 258, 1]),
    (5, 1, 64, 16, [90, 16, 33]),
], ids=["d8", "d64-g3", "d64-g1", "d64-g4", "d64-g5"])
def test_decode_attention_reads_scattered_blocks(dtype, hq, hkv, d, bs, lens):
    nb = max((n + bs - 1) // bs for n in lens)
    nblocks = 3 * nb + 2
    ks = torch.randn(hkv, nblocks * bs, d).to(dtype)  # paged storage: (Hkv, slots, D)
    vs = torch.randn(hkv, nblocks * bs, d).to(dtype)
    gen = torch.Generator().manual_seed(nb)
    tables = [torch.randperm(nblocks, generator=gen)[:nb].tolist() for _ in lens]  # unused tails: padding
    q = torch.randn(3, hq, d).to(dtype)
    out = native.decode_attention(q, ks, vs, torch.tensor(tables, dtype=torch.int32), torch.zeros(3, dtype=torch.int64),
                                  torch.tensor(lens), hkv, bs, 0, nblocks * bs * d)
    for r, (table, n) in enumerate(zip(tables, lens)):
        slots = torch.tensor([blk * bs + i for blk in table for i in range(bs)][:n])
        want = reference_attention(q[r], ks[:, slots], vs[:, slots])
        torch.testing.assert_close(out[r].float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq", [(16, 4), (64, 6)])
def test_decode_attention_meets_sinks_with_their_own_query_and_skips_the_gap(dtype, d, hq):
    """Attention sinks: tokens before sink_end score against qs, those up to gap_end are skipped,
    the rest against q, all under one softmax; rows differ (the last has no gap yet)."""
    hkv, bs, nblocks = 2, 8, 12
    ks, vs = (3 * torch.randn(hkv, nblocks * bs, d)).to(dtype), torch.randn(hkv, nblocks * bs, d).to(dtype)
    tables = torch.tensor([[3, 8, 1, 0], [10, 5, 9, 2], [4, 6, 0, 0]], dtype=torch.int32)
    hi, sink_end, gap_end = torch.tensor([29, 30, 13]), torch.tensor([4, 2, 4]), torch.tensor([8, 8, 4])
    q, qs = torch.randn(3, hq, d).to(dtype), torch.randn(3, hq, d).to(dtype)
    out = native.decode_attention(q, ks, vs, tables, torch.zeros(3, dtype=torch.int64), hi, hkv, bs, 0,
                                  nblocks * bs * d, (qs, sink_end, gap_end))
    for r in range(3):
        slots = torch.tensor([int(blk) * bs + i for blk in tables[r] for i in range(bs)][: hi[r]])
        keys = ks[:, slots].float().repeat_interleave(hq // hkv, 0)  # (Hq, n, D)
        values = vs[:, slots].float().repeat_interleave(hq // hkv, 0)
        scores = (q[r].float()[:, None] @ keys.transpose(-1, -2))[:, 0] * d ** -0.5  # (Hq, n)
        s_end, g_end = int(sink_end[r]), int(gap_end[r])
        scores[:, :s_end] = (qs[r].float()[:, None] @ keys[:, :s_end].transpose(-1, -2))[:, 0] * d ** -0.5
        scores[:, s_end:g_end] = float("-inf")
        want = (scores.softmax(-1)[:, None] @ values)[:, 0]  # (Hq, D)
        torch.testing.assert_close(out[r].float(), want, **TOL[dtype])


def test_model_decode_with_and_without_native_kernels(tiny_model_dir):
    """Same weights, same prompt: a cached decode step's logits agree, fused or not."""
    from kvcache.models.llama import LlamaModel
    from kvcache.models.loader import load_model
    from kvcache.models.step import StepInputs

    loaded = load_model(str(tiny_model_dir), progress=False)
    models = {flag: LlamaModel.from_state_dict(loaded.config, loaded.state_dict, use_native=flag)
              for flag in (True, False)}
    assert models[True].native and not models[False].native
    ids = torch.tensor([[5, 17, 42, 8, 99, 3], [61, 2, 2, 7, 30, 12]])
    logits = {}
    with torch.inference_mode():
        for flag, m in models.items():
            cache = KVCache.for_model(m, 2, 16)
            m.forward(StepInputs(ids, None, 0, None), cache)
            steps = [m.forward(StepInputs(torch.tensor([[t], [t + 1]]), None, cache.length, None), cache)
                     for t in (11, 23, 4)]
            logits[flag] = torch.stack(steps)  # (3, B, V)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_disabled_by_environment_falls_back_to_torch():
    code = "import torch; from kvcache.native import ops as native; print(native.supports(torch.float32, 'cpu'))"
    env = dict(os.environ, KVCACHE_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_a_failed_build_is_one_warning_naming_the_log_of_the_compiler_output(tmp_path, monkeypatch):
    """A source the compiler rejects: torch ops take over after a one-line warning, and the log
    it names (beside the build cache) holds the compiler's error."""
    bad = tmp_path / "kernels.c"
    bad.write_text(build.SOURCE.read_text() + "int broken = ;\n")
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(build, "SOURCE", bad)
    monkeypatch.setattr(build, "_tried", False)
    monkeypatch.setattr(build, "_lib", None)
    with pytest.warns(RuntimeWarning) as caught:
        assert build.load() is None
    message = str(caught[0].message)
    assert len(caught) == 1 and "\n" not in message and "failed to build" in message
    log = Path(message.rsplit(" ", 1)[-1])
    assert log.parent == tmp_path / "home" / "native" and log.suffix == ".log"
    assert "broken" in log.read_text() and "error" in log.read_text()
    with pytest.raises(build.BuildError, match=r"kernels\.c:\d+:\d+: error: "):  # what `_kernels_built` reports
        build.build()


@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 64), (2, 32), (4, 16)])
@pytest.mark.parametrize("exact_tokens", [0, 37])
def test_quantized_decode_attention_equals_attention_over_dequantized(bits, group_size, exact_tokens):
    """From the packed codes, scales folded in: the same as attending over the dequantized cache."""
    from kvcache.cache.quant import dequantize, quantize

    hq, hkv, d, nq = 6, 2, 64, 3 * 128  # several kernel chunks
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    keys = torch.randn(1, hkv, nq, d, generator=gen) * 3 + torch.randn(1, 1, 1, d, generator=gen)  # channel offsets
    values = torch.randn(1, hkv, nq, d, generator=gen)
    qk = quantize(keys, bits, group_size, "channel")
    qv = quantize(values, bits, min(group_size, d), "token")
    ek, ev = torch.randn(hkv, exact_tokens, d, generator=gen), torch.randn(hkv, exact_tokens, d, generator=gen)
    q = torch.randn(hq, d, generator=gen)
    got = native.quantized_decode_attention(q, ek, ev, qk, qv)
    want = reference_attention(q, torch.cat([ek, dequantize(qk)[0]], 1), torch.cat([ev, dequantize(qv)[0]], 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 6, 7, native.SKINNY_ROWS])
@pytest.mark.parametrize("k", [96, 101])  # 101: a tail past the last full vector
def test_skinny_matmul_matches_linear_and_rows_are_independent(rows, k):
    w = torch.randn(200, k)  # (N, K), F.linear's layout; 200 outputs: partial output tiles too
    x = torch.randn(1, rows, k)
    y = native.skinny_matmul(x, w)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    for r in range(rows):  # a row alone gives the very same bits as inside the batch
        assert torch.equal(native.skinny_matmul(x[:, r : r + 1], w), y[:, r : r + 1])


def test_native_linear_uses_torch_for_many_rows():
    """Past SKINNY_ROWS rows (prefill), `Linear(kernels="native")` is F.linear itself, bit for bit."""
    from kvcache.models.linear import Linear

    w = torch.randn(64, 32)
    lin = Linear(w, None, "native")
    x = torch.randn(2, 9, 32)
    assert torch.equal(lin(x), F.linear(x, w))
    torch.testing.assert_close(lin(x[:, :1]), F.linear(x[:, :1], w), rtol=1e-5, atol=1e-5)


def test_quantized_decode_attention_with_rotated_values():
    from kvcache.cache.quant import dequantize, hadamard, quantize

    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, nq = 4, 2, 64, 256
    keys, values = torch.randn(1, hkv, nq, d, generator=gen), torch.randn(1, hkv, nq, d, generator=gen)
    qk = quantize(keys, 2, 32, "channel")
    qv = quantize(values, 2, 64, "token", rotation=hadamard(d))
    ek, ev = torch.randn(hkv, 9, d, generator=gen), torch.randn(hkv, 9, d, generator=gen)
    q = torch.randn(hq, d, generator=gen)
    got = native.quantized_decode_attention(q, ek, ev, qk, qv)
    want = reference_attention(q, torch.cat([ek, dequantize(qk)[0]], 1), torch.cat([ev, dequantize(qv)[0]], 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotate", [False, True])
def test_quantized_decode_attention_rows_equal_each_row_alone(rotate):
    """Several sequences in one call (each with its own lengths, exact tail read in place from
    a longer store): each row's output is the one it gets alone, bit for bit (up to the
    rounding of the batched rotation back, with rotated values)."""
    from kvcache.cache.quant import hadamard, quantize

    gen = torch.Generator().manual_seed(11)
    hq, hkv, d = 6, 2, 64
    rows, alone = [], []
    for nq, ne in ((0, 5), (64, 0), (320, 40), (128, 130)):  # no quantized part; no exact part; both
        keys, values = torch.randn(1, hkv, nq, d, generator=gen), torch.randn(1, hkv, nq, d, generator=gen)
        qk = quantize(keys, 4, 32, "channel")
        qv = quantize(values, 4, 64, "token", rotation=hadamard(d) if rotate else None)
        store = torch.randn(2, hkv, ne + 7, d, generator=gen)  # a longer store: heads (ne + 7) * D apart
        ek, ev = store[0, :, :ne], store[1, :, :ne]
        q = torch.randn(hq, d, generator=gen)
        rows.append((ek, ev, qk, qv))
        alone.append(native.quantized_decode_attention(q, ek.contiguous(), ev.contiguous(), qk, qv))
        alone[-1] = (q, alone[-1])
    qs = torch.stack([q for q, _ in alone])  # (B, Hq, D)
    got = native.quantized_decode_attention_rows(qs, rows)
    for b, (_, want) in enumerate(alone):
        if rotate:
            torch.testing.assert_close(got[b], want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got[b], want), b


@pytest.mark.parametrize("key_bits, value_bits", [(4, 2), (2, 8), (8, 4)])
def test_quantized_decode_attention_keys_and_values_at_different_bits(key_bits, value_bits):
    """A layer held at mixed precision (e.g. 4-bit keys over 2-bit values) reads each at its width."""
    from kvcache.cache.quant import dequantize, quantize

    gen = torch.Generator().manual_seed(key_bits * 10 + value_bits)
    hq, hkv, d, nq = 6, 2, 64, 320
    keys, values = torch.randn(1, hkv, nq, d, generator=gen), torch.randn(1, hkv, nq, d, generator=gen)
    qk, qv = quantize(keys, key_bits, 64, "channel"), quantize(values, value_bits, 32, "token")
    ek, ev = torch.randn(hkv, 5, d, generator=gen), torch.randn(hkv, 5, d, generator=gen)
    q = torch.randn(hq, d, generator=gen)
    got = native.quantized_decode_attention(q, ek, ev, qk, qv)
    want = reference_attention(q, torch.cat([ek, dequantize(qk)[0]], 1), torch.cat([ev, dequantize(qv)[0]], 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_shapes_past_the_kernel_limits_are_refused():
    assert native.fits(64, 9, 3) and not native.fits(512, 8, 8) and not native.fits(64, 64, 2)
    q = torch.randn(1, 64, 8)  # 64 query heads on 2 KV heads: past MAX_GROUP
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="native attention supports"):
        native.decode_attention(q, k, k, torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64),
                                torch.tensor([4]), 2, 4, 2 * 4 * 8, 4 * 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,key_group,value_group,rotate,key_bits", [
    (8, 16, 16, False, 0), (4, 8, 16, False, 0), (4, 16, 16, True, 0), (2, 16, 8, True, 0), (4, 16, 8, False, 8)])
def test_paged_quantized_decode_attention_equals_attention_over_dequantized_blocks(dtype, bits, key_group,
                                                                                   value_group, rotate, key_bits):
    from kvcache.cache.paged_quant import PagedQuantizedStorage, TokenQuantFormat

    hq, hkv, d, bs, nblocks = 4, 2, 16, 4, 12
    st = PagedQuantizedStorage(1, nblocks, bs, hkv, d, dtype, "cpu",
                               TokenQuantFormat(bits, key_group, value_group, clip=bits == 2, rotate_values=rotate,
                                                rotate_keys=rotate, key_bits=key_bits))
    st.zero_blocks(range(nblocks))
    slots = torch.arange(nblocks * bs)
    k, v = 3 * torch.randn(1, hkv, nblocks * bs, d), torch.randn(1, hkv, nblocks * bs, d)  # (B, Hkv, T, D)
    st.scatter(0, slots, k.to(dtype), v.to(dtype))
    tables = [[7, 2, 9], [0, 11, 3], [5, 0, 0]]
    lo, hi = torch.tensor([0, 5, 0]), torch.tensor([11, 9, 3])  # row 1 starts past a released stretch
    q = torch.randn(3, hq, d).to(dtype)
    table = torch.tensor(tables, dtype=torch.int32)
    out = st.decode_attention(0, q, table, lo, hi)
    assert out.dtype == dtype and out.shape == (3, hq, d)
    keys, values = st.read_rows(0, table.long())  # (B, Hkv, 12, D), dequantized
    for r in range(3):
        want = reference_attention(q[r], keys[r, :, lo[r]:hi[r]], values[r, :, lo[r]:hi[r]])
        torch.testing.assert_close(out[r].float(), want, **TOL[dtype])


@pytest.mark.parametrize("bits,group", [(8, 16), (8, 64), (4, 32), (2, 8)])
def test_quantize_to_slots_writes_the_bytes_of_torch_quantize(bits, group):
    from kvcache.cache.quant import quantize

    h, n, d, slots_total = 3, 40, 64, 64
    x = torch.randn(h, n, d) * torch.logspace(-9, 3, n)[None, :, None]  # tiny (fp16 subnormal) to large rows
    x[0, 0] = 1.5  # a constant group: scale 0
    x[1, 1, :group] = 7e4  # past fp16's range: saturates
    x[2, 2, :] = -3e-8
    slots = torch.randperm(slots_total)[:n]
    codes = torch.zeros(h, slots_total, d * bits // 8, dtype=torch.uint8)
    scale = torch.zeros(h, slots_total, d // group, dtype=torch.float16)
    zero = torch.zeros_like(scale)
    native.quantize_to_slots(x, slots, bits, group, codes, scale, zero)
    q = quantize(x[None], bits, group, "token")
    assert torch.equal(codes[:, slots], q.data[0])
    assert torch.equal(scale[:, slots].view(torch.int16), q.scale[0].view(torch.int16))
    assert torch.equal(zero[:, slots].view(torch.int16), q.zero[0].view(torch.int16))


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86 vector targets")
@pytest.mark.parametrize("target", [["-mno-avx512f"], ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                                       "-mavx512bf16"]], ids=["avx2", "avx512"])
def test_library_builds_for_both_vector_targets_with_every_symbol_it_binds(target, tmp_path):
    """A machine of the other kind compiles other code paths: each must build and export the
    kernels `native` binds (a build without AVX-512 once lacked the prefill kernel's symbols).
    Only `prefill_attn_available` (a constant) is called: this CPU may not run AVX-512 code."""
    import ctypes

    so = tmp_path / "kernels.so"
    build.compile_to(build._compiler(), [*build.FLAGS, *target], so)
    lib = ctypes.CDLL(str(so))
    names = [f"{name}_{native._SUFFIX[dtype]}" for name, dtype, _ in native.symbols(lib)]
    assert ("prefill_attn_f32" in names) == ("-mavx512f" in target)
    missing = [n for n in names if not hasattr(lib, n)]
    assert not missing, missing
