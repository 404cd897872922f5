"""The shared KV tier without a model: the value format, the disk LRU, the write queue, and
the ways a lookup fails (corrupt value, server down, server hung), each a counted miss."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

from kvcache.cache.tier import KVTier, TierUnavailable, open_backend
from kvcache.cache.tier.codec import TierValueError, decode_block, encode_block, header_bytes, value_bytes
from kvcache.cache.tier.disk import DiskTier
from kvcache.errors import KVCacheError
from kvcache.bench.serve import free_port
from tests.redis_server import SilentPort

SHAPE = (2, 2, 4, 8)  # (layers, kv_heads, block_size, head_dim)
TOKENS = [5, 6, 7, 8]


def block(seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


# -- the value format ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_block_comes_back_bit_for_bit(dtype):
    k, v = block(0, dtype)
    value = encode_block(k, v, TOKENS)
    assert len(value) == value_bytes(SHAPE, dtype) == header_bytes(4) + 2 * k.numel() * k.element_size()
    k2, v2 = decode_block(value, SHAPE, dtype, TOKENS)
    assert k2.dtype == dtype and torch.equal(k2, k) and torch.equal(v2, v)


def test_every_flipped_byte_is_refused():
    value = encode_block(*block(1), TOKENS)
    for pos in (0, 5, 20, len(value) // 2, len(value) - 1):
        bad = bytearray(value)
        bad[pos] ^= 0x01
        with pytest.raises(TierValueError):
            decode_block(bytes(bad), SHAPE, torch.float32, TOKENS)


def test_a_value_for_another_block_is_refused():
    value = encode_block(*block(2), TOKENS)
    with pytest.raises(TierValueError, match="tokens"):
        decode_block(value, SHAPE, torch.float32, [5, 6, 7, 9])
    with pytest.raises(TierValueError):
        decode_block(value, SHAPE, torch.bfloat16, TOKENS)  # another dtype: another size
    with pytest.raises(TierValueError):
        decode_block(value[:-1], SHAPE, torch.float32, TOKENS)


# -- the disk backend -------------------------------------------------------------------------
def test_disk_tier_keeps_to_its_byte_bound_least_recently_used_first(tmp_path):
    size = value_bytes(SHAPE, torch.float32)
    tier = DiskTier(tmp_path, max_bytes=3 * size)
    value = encode_block(*block(3), TOKENS)
    for key in ("a", "b", "c"):
        tier.put(key, value)
        time.sleep(0.01)  # distinct mtimes
    assert tier.get_many(["a"], time.monotonic() + 1) == [value]  # a is now the most recent
    tier.put("d", value)  # one over the bound: b, the least recently used, goes
    assert tier.stored_bytes() == 3 * size
    assert sorted(p.stem for p in tmp_path.glob("*.kvb")) == ["a", "c", "d"]
    assert sum(p.stat().st_size for p in tmp_path.glob("*.kvb")) == 3 * size
    assert tier.get_many(["b", "c"], time.monotonic() + 1) == [None]  # stops at the first absent key


def test_disk_tier_recency_survives_a_restart(tmp_path):
    value = encode_block(*block(4), TOKENS)
    first = DiskTier(tmp_path)
    for key in ("old", "new"):
        first.put(key, value)
        time.sleep(0.01)
    os.utime(tmp_path / "old.kvb", (1, 1))  # long unused
    again = DiskTier(tmp_path, max_bytes=len(value))  # a new process on the same folder, a tighter bound
    assert again.stored_bytes() == len(value)
    assert again.get_many(["new"], time.monotonic() + 1) == [value]
    assert not (tmp_path / "old.kvb").exists()


# -- the tier over a backend ------------------------------------------------------------------
class MemoryBackend:
    """A dict backend whose `put` can be held (a stalled writer)."""

    url = "memory:"

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.release = threading.Event()
        self.release.set()

    def get_many(self, keys, deadline):
        out = []
        for key in keys:
            out.append(self.values.get(key))
            if out[-1] is None:
                break
        return out

    def put(self, key, value):
        self.release.wait()
        self.values[key] = value

    def stored_bytes(self):
        return sum(map(len, self.values.values()))

    def close(self):
        pass


def make_tier(backend, **kw) -> KVTier:
    return KVTier(backend, "f" * 32, SHAPE, torch.float32, **kw)


def test_tier_round_trip_and_longest_run():
    backend = MemoryBackend()
    tier = make_tier(backend)
    blocks = [block(i) for i in range(3)]
    for h, (k, v) in zip((11, 12, 14), blocks):  # 13 is never written
        assert tier.offer(h, TOKENS, lambda k=k, v=v: (k, v))
    assert tier.flush()
    got = tier.fetch([11, 12, 13, 14], [TOKENS] * 4)
    assert len(got) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, blocks))
    s = tier.stats()
    assert (s["kv_tier_hits"], s["kv_tier_misses"], s["kv_tier_writes"], s["kv_tier_errors"]) == (2, 2, 3, 0)
    assert s["kv_tier_stored_bytes"] == s["kv_tier_bytes_written"] == 3 * tier.value_bytes
    assert s["kv_tier_bytes_read"] == 2 * tier.value_bytes


def test_a_full_write_queue_drops_and_counts_without_waiting():
    backend = MemoryBackend()
    backend.release.clear()  # the writer takes the first block and stalls on it
    tier = make_tier(backend, queue_blocks=2)
    reads = []
    t0 = time.monotonic()
    results = [tier.offer(h, TOKENS, lambda h=h: reads.append(h) or block(0)) for h in range(6)]
    assert time.monotonic() - t0 < 0.5  # never blocked
    assert results.count(False) >= 3 and tier.stats()["kv_tier_dropped_writes"] == results.count(False)
    assert len(reads) == results.count(True)  # a dropped block is not even copied out of the pool
    backend.release.set()
    assert tier.flush()
    assert tier.stats()["kv_tier_writes"] == results.count(True)


def test_a_corrupt_value_is_a_counted_miss_logged_once(caplog):
    backend = MemoryBackend()
    tier = make_tier(backend)
    tier.offer(21, TOKENS, lambda: block(5))
    tier.offer(22, TOKENS, lambda: block(6))
    tier.flush()
    key = tier.key(22)
    backend.values[key] = backend.values[key][:100] + bytes([backend.values[key][100] ^ 0xFF]) + backend.values[key][101:]
    with caplog.at_level(logging.WARNING, logger="kvcache.tier"):
        assert len(tier.fetch([21, 22], [TOKENS] * 2)) == 1
        assert len(tier.fetch([21, 22], [TOKENS] * 2)) == 1
    assert tier.stats()["kv_tier_errors_by_kind"] == {"corrupt": 2}
    assert len([r for r in caplog.records if "checksum" in r.getMessage()]) == 1


def test_an_unreachable_redis_is_a_counted_miss(caplog):
    pytest.importorskip("redis")
    tier = KVTier(open_backend(f"redis://127.0.0.1:{free_port()}", 0.2), "f" * 32, SHAPE, torch.float32,
                  timeout_s=0.2, retry_s=60)
    with caplog.at_level(logging.WARNING, logger="kvcache.tier"):
        assert tier.fetch([1, 2], [TOKENS] * 2) == []
        assert tier.fetch([1, 2], [TOKENS] * 2) == []  # resting: not asked again
        assert not tier.offer(1, TOKENS, lambda: block(0))  # writes are dropped while it rests
    s = tier.stats()
    assert s["kv_tier_errors_by_kind"] == {"unreachable": 1} and s["kv_tier_misses"] == 4
    assert s["kv_tier_dropped_writes"] == 1
    assert len([r for r in caplog.records if r.name == "kvcache.tier"]) == 1


def test_a_hung_redis_is_a_miss_within_the_time_bound():
    pytest.importorskip("redis")
    silent = SilentPort()
    try:
        tier = KVTier(open_backend(silent.url, 0.2), "f" * 32, SHAPE, torch.float32, timeout_s=0.2)
        t0 = time.monotonic()
        assert tier.fetch([1], [TOKENS]) == []
        assert time.monotonic() - t0 < 1.0
        assert tier.stats()["kv_tier_errors_by_kind"] == {"timeout": 1}
    finally:
        silent.close()


def test_redis_round_trip_and_server_lru(redis_server, redis_url):
    tier = KVTier(open_backend(redis_url, 1.0), "f" * 32, SHAPE, torch.float32, timeout_s=1.0)
    k, v = block(7)
    tier.offer(31, TOKENS, lambda: (k, v))
    assert tier.flush()
    (k2, v2), = tier.fetch([31], [TOKENS])
    assert torch.equal(k, k2) and torch.equal(v, v2)
    assert redis_server.client().strlen(tier.key(31)) == tier.value_bytes
    policy = redis_server.client().config_get("maxmemory-policy")
    assert policy == {"maxmemory-policy": "allkeys-lru"}


@pytest.mark.parametrize("url", ["", "redis://", "redis://h:notaport", "http://x", "disk:", "redis://h:1/x"])
def test_bad_tier_urls_are_one_sentence(url):
    with pytest.raises(KVCacheError, match="kv_tier"):
        open_backend(url, 0.1)


def test_unavailable_carries_its_kind():
    assert TierUnavailable("timeout", "slow").kind == "timeout"


def test_a_redis_error_reply_is_a_counted_miss(monkeypatch):
    redis = pytest.importorskip("redis")
    backend = open_backend(f"redis://127.0.0.1:{free_port()}", 0.2)

    def refuse(*_):
        raise redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(backend._client, "mget", refuse)
    tier = KVTier(backend, "f" * 32, SHAPE, torch.float32, timeout_s=0.2)
    assert tier.fetch([1], [TOKENS]) == []
    assert tier.stats()["kv_tier_errors_by_kind"] == {"server": 1}


def test_credentials_stay_out_of_the_shown_url():
    pytest.importorskip("redis")
    assert open_backend("redis://user:secret@127.0.0.1:6390/2", 0.1).url == "redis://127.0.0.1:6390/2"
