"""The dense KVCache and the causal mask built over its slots."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvcache.cache.dense import KVCache
from kvcache.cache.spec import KVFormat, ModelShape, kv_bytes
from kvcache.models.sdpa import grouped_sdpa as attend
from kvcache.models.step import causal_mask

L, B, H, D = 3, 2, 2, 4


def kv(t: int, seed: int, batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, t, D, generator=g), torch.randn(batch, H, t, D, generator=g)


def fill(cache: KVCache, t: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Write t new slots to every layer, then advance; return what was written per layer."""
    written = []
    for layer in range(cache.num_layers):
        k, v = kv(t, seed * 100 + layer, cache.batch)
        cache.write(layer, k, v)
        written.append((k, v))
    cache.advance(t)
    return written


# ----------------------------------------------------------------------------- write / advance


def test_write_returns_views_of_everything_written():
    cache = KVCache(L, B, H, D, capacity=16, dtype=torch.float32)
    history = [([], []) for _ in range(L)]
    for step, t in enumerate([5, 1, 1, 3]):
        start = cache.length
        for layer in range(L):
            k, v = kv(t, 10 * step + layer)
            kk, vv = cache.write(layer, k, v)
            assert cache.length == start  # only advance() moves the length
            history[layer][0].append(k)
            history[layer][1].append(v)
            assert kk.shape == vv.shape == (B, H, start + t, D)
            assert torch.equal(kk, torch.cat(history[layer][0], 2))
            assert torch.equal(vv, torch.cat(history[layer][1], 2))
        cache.advance(t)
        assert cache.length == start + t
    # layers are independent
    assert not torch.equal(cache.k[0, :, :, : cache.length], cache.k[1, :, :, : cache.length])


def test_write_casts_to_cache_dtype():
    cache = KVCache(1, 1, H, D, capacity=4, dtype=torch.bfloat16)
    k, v = kv(2, 0, batch=1)
    kk, vv = cache.write(0, k, v)
    assert kk.dtype == torch.bfloat16
    assert torch.equal(kk, k.to(torch.bfloat16)) and torch.equal(vv, v.to(torch.bfloat16))


# ----------------------------------------------------------------------------- reserve


def test_reserve_doubles_capacity_and_keeps_contents():
    cache = KVCache(L, B, H, D, capacity=4, dtype=torch.float32)
    written = fill(cache, 3, seed=1)
    cache.reserve(4)
    assert cache.capacity == 4  # already enough room
    cache.reserve(5)
    assert cache.capacity == 8  # doubled, not just 5
    for layer, (k, v) in enumerate(written):
        assert torch.equal(cache.k[layer, :, :, :3], k) and torch.equal(cache.v[layer, :, :, :3], v)
    cache.reserve(40)
    assert cache.capacity == 40  # a bigger jump than doubling
    assert cache.length == 3
    more = fill(cache, 30, seed=2)
    for layer in range(L):
        assert torch.equal(cache.k[layer, :, :, :33], torch.cat([written[layer][0], more[layer][0]], 2))
        assert torch.equal(cache.v[layer, :, :, :33], torch.cat([written[layer][1], more[layer][1]], 2))


def test_capacity_zero_is_usable():
    cache = KVCache(1, 1, H, D, capacity=0, dtype=torch.float32)
    assert cache.capacity >= 1
    cache.reserve(3)
    assert cache.capacity >= 3
    fill(cache, 3, seed=0)
    assert cache.length == 3


# ----------------------------------------------------------------------------- truncate / clear


def test_truncate_then_overwrite():
    cache = KVCache(L, B, H, D, capacity=8, dtype=torch.float32)
    first = fill(cache, 5, seed=1)
    cache.truncate(2)
    assert cache.length == 2 and cache.capacity == 8
    k, v = kv(3, 99)
    kk, vv = cache.write(0, k, v)
    assert kk.shape[2] == 5
    assert torch.equal(kk[:, :, :2], first[0][0][:, :, :2]) and torch.equal(kk[:, :, 2:], k)
    assert torch.equal(vv[:, :, :2], first[0][1][:, :, :2]) and torch.equal(vv[:, :, 2:], v)
    cache.truncate(2)  # same length: a no-op
    cache.truncate(0)
    assert cache.length == 0


@pytest.mark.parametrize("n", [-1, 6, 100])
def test_truncate_out_of_range_raises(n):
    cache = KVCache(1, 1, H, D, capacity=8, dtype=torch.float32)
    fill(cache, 5, seed=0)
    with pytest.raises(ValueError):
        cache.truncate(n)
    assert cache.length == 5


def test_clear_resets_length_and_padding_but_keeps_storage():
    cache = KVCache(L, B, H, D, capacity=8, dtype=torch.float32)
    cache.row_start = [0, 3]
    fill(cache, 5, seed=0)
    storage = cache.k.data_ptr()
    cache.clear()
    assert cache.length == 0 and cache.row_start == [0] * B
    assert cache.tokens_held == 0 and cache.nbytes_used == 0
    assert cache.k.data_ptr() == storage and cache.capacity == 8
    assert cache.key_valid() is None


# ----------------------------------------------------------------------------- key_valid


def test_key_valid_none_without_padding():
    cache = KVCache(1, 3, H, D, capacity=8, dtype=torch.float32)
    fill(cache, 4, seed=0)
    assert cache.key_valid() is None and cache.key_valid(extra=1) is None


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_key_valid_with_row_start(extra):
    cache = KVCache(1, 3, H, D, capacity=8, dtype=torch.float32)
    cache.row_start = [0, 2, 4]
    fill(cache, 5, seed=0)
    valid = cache.key_valid(extra=extra)
    assert valid.dtype == torch.bool and valid.shape == (3, 5 + extra)
    for b, start in enumerate(cache.row_start):
        assert valid[b].tolist() == [s >= start for s in range(5 + extra)]


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("dtype,fmt", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_byte_accounting(dtype, fmt):
    el = torch.empty(0, dtype=dtype).element_size()
    cache = KVCache(L, B, H, D, capacity=6, dtype=dtype)
    assert cache.bytes_per_token == 2 * L * H * D * el
    assert cache.nbytes_allocated == 2 * L * B * H * 6 * D * el
    assert cache.nbytes_used == 0
    cache.row_start = [0, 3]
    fill(cache, 5, seed=0)
    assert cache.tokens_held == 5 + 2  # row 1's first 3 slots are padding
    assert cache.nbytes_used == cache.tokens_held * cache.bytes_per_token
    shape = ModelShape("t", num_layers=L, num_heads=2 * H, num_kv_heads=H, head_dim=D, hidden_size=2 * H * D,
                       max_position_embeddings=64)
    kvf = KVFormat.parse(fmt)
    assert cache.nbytes_used == kv_bytes(shape, kvf, 5) + kv_bytes(shape, kvf, 2)
    cache.reserve(7)
    assert cache.nbytes_allocated == 2 * L * B * H * 12 * D * el
    cache.truncate(2)
    assert cache.tokens_held == 2  # row 1 holds nothing real any more
    assert cache.nbytes_used == kv_bytes(shape, kvf, 2)


# ----------------------------------------------------------------------------- causal_mask


def test_causal_mask_none_for_plain_decode():
    assert causal_mask(None, 3, 7, 1, "cpu") is None


@pytest.mark.parametrize("start,t", [(0, 1), (0, 5), (3, 4)])
def test_causal_mask_without_padding(start, t):
    mask = causal_mask(None, 2, start, t, "cpu")
    if t == 1:
        assert mask is None
        return
    assert mask.dtype == torch.bool and mask.shape == (2, 1, t, start + t)
    for b, i, j in itertools.product(range(2), range(t), range(start + t)):
        assert bool(mask[b, 0, i, j]) == (j <= start + i)


@pytest.mark.parametrize("start,t", [(0, 6), (4, 1), (4, 3)])
def test_causal_mask_with_padding(start, t):
    s = start + t
    row_start = [0, 2, s]  # the last row is padding everywhere (its queries are padding too)
    valid = torch.tensor([[j >= rs for j in range(s)] for rs in row_start])
    mask = causal_mask(valid, 3, start, t, "cpu")
    assert mask.shape == (3, 1, t, s)
    for b, i, j in itertools.product(range(3), range(t), range(s)):
        q = start + i
        want = (j <= q and bool(valid[b, j])) or j == q
        assert bool(mask[b, 0, i, j]) == want, (b, i, j)
    assert mask.any(-1).all()  # no query row is empty, padded or not
    # a padding query sees exactly itself
    for i in range(t):
        assert mask[2, 0, i].nonzero().flatten().tolist() == [start + i]


def test_padded_attention_is_finite_and_ignores_padding():
    t, pad = 6, 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, t, D, generator=g)  # 4 query heads over 2 KV heads (GQA)
    k, v = torch.randn(2, H, t, D, generator=g), torch.randn(2, H, t, D, generator=g)
    valid = torch.tensor([[True] * t, [False] * pad + [True] * (t - pad)])
    out = attend(q, k, v, causal_mask(valid, 2, 0, t, "cpu"))
    assert torch.isfinite(out).all()
    # row 1 equals the same row computed alone without its padding
    alone = attend(q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:], causal_mask(None, 1, 0, t - pad, "cpu"))
    torch.testing.assert_close(out[1:, pad:], alone)
    # changing padding keys/values does not change real queries
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :pad] += 5.0
    v2[1, :, :pad] -= 5.0
    torch.testing.assert_close(attend(q, k2, v2, causal_mask(valid, 2, 0, t, "cpu"))[1, pad:], out[1, pad:])
