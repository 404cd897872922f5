"""Quantization of KV tensors: packing, error bounds, byte counts, the appendable store."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.cache.quant import (
    BITS,
    QuantizedBuffer,
    QTensor,
    dequantize,
    error_bound,
    pack_codes,
    quantize,
    quantized_scores,
    unpack_codes,
)
from kvcache.cache.spec import KVFormat, ModelShape, kv_bytes_per_token_per_layer, kv_tensor_bytes
from kvcache.errors import KVCacheError

FAST = settings(max_examples=60, deadline=None)
AXES = ("channel", "token")


def _fmt(bits: int, group_size: int) -> KVFormat:
    return KVFormat.parse(f"int{bits}", group_size=group_size)


def _values(seed: int, shape, magnitude: float, offset: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * magnitude + offset  # (B, H, S, D)


@st.composite
def cases(draw):
    """(x, bits, group_size, axis): random shapes and value ranges, some groups constant."""
    bits = draw(st.sampled_from(BITS))
    axis = draw(st.sampled_from(AXES))
    group_size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    head_dim = draw(st.sampled_from([4, 8, 16, 32, 64]))
    if axis == "token":
        head_dim = max(head_dim, group_size)
    seq = group_size * draw(st.integers(1, 3)) if axis == "channel" else draw(st.integers(1, 9))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), seq, head_dim)
    magnitude = draw(st.sampled_from([1e-6, 1e-3, 0.1, 1.0, 30.0, 1000.0]))
    offset = draw(st.sampled_from([0.0, 0.37, -5.0, 1234.5]))
    x = _values(draw(st.integers(0, 2**31 - 1)), shape, magnitude, offset)
    if draw(st.booleans()):  # constant groups: a whole token / channel set to one value
        x[:, :, 0, :] = offset + 0.1
        x[..., 0] = offset - 1 / 3
    return x, bits, group_size, axis


# ---------------------------------------------------------------- packing


@FAST
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 5), bytes_=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_packing_round_trip_is_exact(bits, rows, bytes_, seed):
    per = 8 // bits
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, bytes_ * per), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, bytes_)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_packing_layout_is_planar():
    """Code d sits in byte d % Dp at bit (d // Dp) * bits."""
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack_codes(torch.tensor([[5, 12, 7, 9]], dtype=torch.uint8), 4).tolist() == [
        [5 | 7 << 4, 12 | 9 << 4]
    ]


@pytest.mark.parametrize("bits", [4, 2])
def test_unpacking_strided_and_word_sized_rows(bits):
    """Rows of 8k bytes unpack as int64 words, also from a slice of bigger storage."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (2, 3, 10, 64), generator=gen, dtype=torch.uint8)
    storage = torch.zeros(2, 3, 16, 64 * bits // 8, dtype=torch.uint8)
    storage[:, :, 2:12] = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(storage[:, :, 2:12], bits), codes)
    assert torch.equal(unpack_codes(storage[:, :, 2:12, 1:], bits), unpack_codes(
        storage[:, :, 2:12, 1:].contiguous(), bits))  # odd row length: byte path


# ---------------------------------------------------------------- error bound


@FAST
@given(cases())
def test_error_within_half_the_stored_scale(case):
    x, bits, group_size, axis = case
    q = quantize(x, bits, group_size, axis)
    y = dequantize(q)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert ((x - y).abs() <= error_bound(q, x)).all()


@FAST
@given(cases())
def test_stored_scale_is_near_the_ideal_one(case):
    """scale <= (max - min + ulp16(min)) / levels * (1 + 2^-10) + 2^-24, zero <= min."""
    x, bits, group_size, axis = case
    q = quantize(x, bits, group_size, axis)
    B, H, S, D = x.shape
    g = (x.view(B, H, S // group_size, group_size, D) if axis == "channel"
         else x.view(B, H, S, D // group_size, group_size))
    dim = 3 if axis == "channel" else 4
    lo, hi = g.amin(dim).double(), g.amax(dim).double()
    ulp = torch.maximum(lo.abs() * 2.0**-10, torch.full_like(lo, 2.0**-24))
    levels = (1 << bits) - 1
    assert (q.zero.double() <= lo).all()
    assert (q.zero.double() >= lo - ulp).all()
    assert (q.scale.double() <= (hi - lo + ulp) / levels * (1 + 2.0**-10) + 2.0**-24).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
def test_constant_groups_are_exact_and_finite(bits, axis):
    x = torch.full((1, 2, 8, 8), 0.375)
    q = quantize(x, bits, 4, axis)
    assert (q.scale == 0).all()
    assert torch.equal(dequantize(q), x)
    z = torch.zeros(1, 1, 4, 8)
    assert torch.equal(dequantize(quantize(z, bits, 4, axis)), z)


def test_constant_not_representable_in_fp16_stays_close():
    x = torch.full((1, 1, 4, 8), 0.1)
    y = dequantize(quantize(x, 4, 4, "channel"))
    assert torch.isfinite(y).all() and (y - x).abs().max() < 1e-4


def test_values_beyond_fp16_saturate_without_inf():
    x = torch.tensor([1e6, -1e6, 0.0, 1.0]).view(1, 1, 1, 4)
    y = dequantize(quantize(x, 8, 4, "token"))
    assert torch.isfinite(y).all()
    step = (2 * 65504 / 255) * 1.01
    assert abs(y[0, 0, 0, 0] - 65504) <= step and y[0, 0, 0, 1] == -65504


def test_codes_use_the_full_range():
    x = torch.linspace(-1, 1, 16).view(1, 1, 1, 16)
    q = quantize(x, 4, 16, "token")
    assert sorted(unpack_codes(q.data, 4).flatten().tolist()) == list(range(16))


# ---------------------------------------------------------------- dequantize into a buffer


@pytest.mark.parametrize("axis", AXES)
def test_dequantize_into_a_slice_of_a_scratch_buffer(axis):
    x = _values(1, (2, 3, 8, 16), 1.0, 0.0)
    q = quantize(x, 4, 4, axis)
    scratch = torch.full((2, 3, 20, 16), 7.0)
    view = scratch[:, :, 5:13]
    assert dequantize(q, out=view) is view
    assert torch.equal(scratch[:, :, 5:13], dequantize(q))
    assert (scratch[:, :, :5] == 7).all() and (scratch[:, :, 13:] == 7).all()


def test_dequantize_to_bfloat16():
    x = _values(2, (1, 2, 8, 16), 1.0, 0.0)
    q = quantize(x, 8, 8, "channel")
    y = dequantize(q, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, dequantize(q).to(torch.bfloat16))
    out = torch.empty(1, 2, 8, 16, dtype=torch.bfloat16)
    assert torch.equal(dequantize(q, out=out), y)


def test_bfloat16_input_is_accepted():
    x = _values(3, (1, 1, 4, 8), 1.0, 0.0).to(torch.bfloat16)
    q = quantize(x, 8, 4, "token")
    assert ((x.float() - dequantize(q)).abs() <= error_bound(q, x)).all()


def test_wrong_output_buffer_raises():
    q = quantize(torch.zeros(1, 1, 4, 8), 8, 4, "token")
    with pytest.raises(KVCacheError):
        dequantize(q, out=torch.empty(1, 1, 5, 8))
    with pytest.raises(KVCacheError):
        dequantize(q, out=torch.empty(1, 1, 4, 8, dtype=torch.int32))


# ---------------------------------------------------------------- bytes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_qtensor_nbytes_matches_the_calculator(bits, axis, group_size):
    B, H, S, D = 2, 3, 128, 64
    q = quantize(torch.randn(B, H, S, D), bits, group_size, axis)
    assert q.nbytes == kv_tensor_bytes(_fmt(bits, group_size), S, H, D, axis, batch=B)
    assert q.data.numel() * 8 == B * H * S * D * bits  # really packed


@pytest.mark.parametrize("bits", BITS)
def test_kivi_k_and_v_bytes_match_bytes_per_token(bits):
    shape = ModelShape("smol", 30, 9, 3, 64, 576, 8192)
    fmt = _fmt(bits, 32)
    n = 96
    k = quantize(torch.randn(1, 3, n, 64), bits, 32, "channel")
    v = quantize(torch.randn(1, 3, n, 64), bits, 32, "token")
    assert k.nbytes + v.nbytes == n * kv_bytes_per_token_per_layer(shape, fmt)


def test_calculator_known_values():
    # int4, g32, 3 heads x 64 dims, 64 tokens: 3*64*64/2 data + groups * 4
    fmt = _fmt(4, 32)
    assert kv_tensor_bytes(fmt, 64, 3, 64, "channel") == 6144 + 3 * 64 * 2 * 4
    assert kv_tensor_bytes(fmt, 64, 3, 64, "token") == 6144 + 3 * 64 * 2 * 4
    assert kv_tensor_bytes(fmt, 33, 3, 64, "channel") == 3 * 33 * 32 + 3 * 64 * 2 * 4
    assert kv_tensor_bytes(KVFormat.parse("fp16"), 10, 3, 64) == 10 * 3 * 64 * 2
    with pytest.raises(KVCacheError):
        kv_tensor_bytes(fmt, 10, 3, 64, "head")


# ---------------------------------------------------------------- store


def _store(axis: str, bits: int = 4, group_size: int = 4, capacity: int = 4, layers: int = 2):
    return QuantizedBuffer(layers, 2, 3, 16, bits, group_size, axis, capacity_tokens=capacity)


@pytest.mark.parametrize("bits", BITS)
def test_store_per_channel_appends_whole_groups_and_grows(bits):
    store = _store("channel", bits)
    x = _values(4, (2, 3, 24, 16), 1.0, 0.0)
    for a, b in ((0, 4), (4, 12), (12, 16), (16, 24)):
        store.append(0, x[:, :, a:b])
    assert store.num_tokens(0) == 24 and store.num_tokens(1) == 0
    assert store.capacity >= 24 and store.capacity % 4 == 0
    out = torch.zeros(2, 3, 30, 16)
    assert store.dequantize_into(0, out, start=3) == 24
    assert torch.equal(out[:, :, 3:27], dequantize(quantize(x, bits, 4, "channel")))
    assert (out[:, :, :3] == 0).all() and (out[:, :, 27:] == 0).all()


@pytest.mark.parametrize("bits", BITS)
def test_store_per_token_appends_any_count(bits):
    store = _store("token", bits, capacity=1)
    x = _values(5, (2, 3, 11, 16), 1.0, 0.0)
    for a, b in ((0, 1), (1, 2), (2, 7), (7, 11)):
        store.append(1, x[:, :, a:b])
    out = torch.empty(2, 3, 11, 16)
    assert store.dequantize_into(1, out) == 11
    assert torch.equal(out, dequantize(quantize(x, bits, 4, "token")))


def test_store_growth_keeps_other_layers():
    store = _store("token", capacity=2)
    a, b = _values(6, (2, 3, 2, 16), 1.0, 0.0), _values(7, (2, 3, 9, 16), 1.0, 0.0)
    store.append(0, a)
    store.append(1, b)  # grows past layer 0's tokens
    out = torch.empty(2, 3, 2, 16)
    store.dequantize_into(0, out)
    assert torch.equal(out, dequantize(quantize(a, 4, 4, "token")))
    assert store.capacity >= 9


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_store_nbytes_matches_the_calculator(axis, bits):
    store = _store(axis, bits, capacity=64)
    fmt = _fmt(bits, 4)
    store.append(0, torch.randn(2, 3, 8, 16))
    store.append(1, torch.randn(2, 3, 12, 16))
    expected = sum(kv_tensor_bytes(fmt, n, 3, 16, axis, batch=2) for n in (8, 12))
    assert store.nbytes == expected
    assert store.nbytes_allocated == 2 * kv_tensor_bytes(fmt, 64, 3, 16, axis, batch=2)
    store.truncate(4)
    assert store.nbytes == 2 * kv_tensor_bytes(fmt, 4, 3, 16, axis, batch=2)
    store.clear()
    assert store.nbytes == 0 and store.num_tokens(1) == 0


def test_store_truncate_then_append_overwrites():
    store = _store("channel")
    x, y = _values(8, (2, 3, 8, 16), 1.0, 0.0), _values(9, (2, 3, 4, 16), 1.0, 0.0)
    store.append(0, x)
    store.truncate(4, layer=0)
    store.append(0, y)
    out = torch.empty(2, 3, 8, 16)
    store.dequantize_into(0, out)
    assert torch.equal(out[:, :, 4:], dequantize(quantize(y, 4, 4, "channel")))


def test_store_view_is_a_qtensor():
    store = _store("token")
    store.append(0, torch.randn(2, 3, 5, 16))
    q = store.view(0)
    assert isinstance(q, QTensor) and q.shape == (2, 3, 5, 16) and q.data.shape[2] == 5


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args",
    [
        (3, 4, "token"),  # bits
        (4, 0, "token"),  # group size
        (4, 4, "head"),  # axis
        (4, 3, "token"),  # group does not divide head_dim
        (4, 5, "channel"),  # 8 tokens are not whole groups of 5
    ],
)
def test_quantize_rejects_bad_parameters(args):
    with pytest.raises(KVCacheError):
        quantize(torch.zeros(1, 1, 8, 8), *args)


def test_quantize_rejects_bad_tensors():
    with pytest.raises(KVCacheError):
        quantize(torch.zeros(8, 8), 4, 4, "token")
    with pytest.raises(KVCacheError):
        quantize(torch.zeros(1, 1, 8, 8, dtype=torch.int32), 4, 4, "token")
    with pytest.raises(KVCacheError):
        quantize(torch.zeros(1, 1, 4, 6), 2, 2, "token")  # 6 int2 codes are not whole bytes


def test_store_rejects_bad_input():
    with pytest.raises(KVCacheError):
        QuantizedBuffer(0, 1, 1, 16, 4, 4, "token")
    store = _store("channel")
    with pytest.raises(KVCacheError):
        store.append(0, torch.zeros(2, 3, 3, 16))  # not whole groups
    with pytest.raises(KVCacheError):
        store.append(0, torch.zeros(2, 2, 4, 16))  # wrong heads
    with pytest.raises(KVCacheError):
        store.append(2, torch.zeros(2, 3, 4, 16))  # no such layer
    store.append(0, torch.zeros(2, 3, 8, 16))
    with pytest.raises(KVCacheError):
        store.truncate(6)
    with pytest.raises(KVCacheError):
        store.dequantize_into(0, torch.empty(2, 3, 7, 16))


# ---------------------------------------------------------------- scores from quantized keys


@pytest.mark.parametrize("bits", BITS)
def test_quantized_scores_equal_dequantize_then_matmul(bits):
    k = quantize(_values(10, (2, 3, 64, 16), 1.0, 0.2), bits, 16, "channel")
    q = _values(11, (2, 3, 5, 16), 1.0, 0.0)
    expected = q @ dequantize(k).transpose(-1, -2)  # (B, H, Tq, S)
    got = quantized_scores(q, k)
    assert got.shape == (2, 3, 5, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_quantized_scores_need_per_channel_keys():
    v = quantize(torch.zeros(1, 1, 4, 8), 8, 4, "token")
    with pytest.raises(KVCacheError):
        quantized_scores(torch.zeros(1, 1, 1, 8), v)


# ---------------------------------------------------------------- clipped ranges


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
def test_clipped_ranges_never_add_error_per_group(bits, axis):
    """Each group keeps the range with the least squared error, the plain one among the candidates."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 32, 16, generator=gen) * torch.rand(1, 1, 1, 16, generator=gen) * 4
    x[0, 1, 5, 3] = 40.0  # an outlier that stretches its groups
    group = 8
    plain, clipped = quantize(x, bits, group, axis), quantize(x, bits, group, axis, clip=True)

    def group_error(q):
        e = (dequantize(q) - x).square()
        return (e.view(2, 3, 4, group, 16).sum(3) if axis == "channel" else e.view(2, 3, 32, 2, group).sum(4))

    assert (group_error(clipped) <= group_error(plain) * (1 + 1e-6) + 1e-9).all()
    if bits == 2:  # four levels: clipping pays off somewhere
        assert group_error(clipped).sum() < 0.9 * group_error(plain).sum()
    assert int(unpack_codes(clipped.data, bits).max()) <= (1 << bits) - 1


def test_policy_clip_key():
    from kvcache.cache.policies.grammar import parse_policy

    assert parse_policy("quantized:bits=2").store.params["clip"] == "auto"
    with pytest.raises(KVCacheError, match="clip must be one of auto, none, mse"):
        parse_policy("quantized:bits=2,clip=maybe")


def test_hadamard_is_orthonormal_and_only_for_powers_of_two():
    from kvcache.cache.quant import hadamard

    h = hadamard(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), rtol=0, atol=1e-6)
    assert torch.equal(h, h.T) and hadamard(96) is None


def test_rotated_values_round_trip_and_shrink_an_outlier_channel():
    """Quantizing x @ H spreads one large channel over all of them: less error at 2 bits."""
    from kvcache.cache.quant import hadamard

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 64, 64, generator=gen)
    x[..., 5] += 12.0  # an outlier channel in every token
    plain = quantize(x, 2, 64, "token")
    rotated = quantize(x, 2, 64, "token", rotation=hadamard(64))
    assert rotated.rotation is not None
    err_plain, err_rot = (dequantize(plain) - x).square().sum(), (dequantize(rotated) - x).square().sum()
    assert err_rot < 0.5 * err_plain
    y = dequantize(rotated, dtype=torch.bfloat16)  # through a buffer of another dtype as well
    torch.testing.assert_close(y.float(), dequantize(rotated), rtol=1e-2, atol=2e-2)
