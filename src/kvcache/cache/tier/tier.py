"""`KVTier`: full KV blocks shared beyond one process, keyed by model fingerprint and chained hash.

Writes are asynchronous: `offer` puts a block on a bounded queue that one writer thread
drains into the backend; when the queue is full the block is dropped and counted, so a
step never waits for the tier. Reads (`fetch`) are synchronous and bounded in time: the
longest run of consecutive blocks that arrive within `timeout_s`, each checked by
`codec.decode_block`. Whatever goes wrong (backend down, too slow, a corrupt value) is a
miss: counted, logged once per kind, never raised. After a backend failure the tier rests
for `retry_s` (lookups are misses, writes are dropped) so a dead server costs one time
bound, not one per request.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from kvcache.cache.tier.backend import TierBackend, TierUnavailable
from kvcache.cache.tier.codec import TierValueError, decode_block, encode_block, value_bytes

__all__ = ["KVTier"]

log = logging.getLogger("kvcache.tier")


class KVTier:
    """One model's view of a tier backend: its blocks' keys, the write queue, the counters."""

    def __init__(self, backend: TierBackend, fingerprint: str, block_shape: tuple[int, int, int, int],
                 dtype: torch.dtype, timeout_s: float = 0.25, queue_blocks: int = 256, retry_s: float = 1.0):
        """`block_shape`: (layers, kv_heads, block_size, head_dim) of one block's K (and V)."""
        self.backend, self.fingerprint = backend, fingerprint
        self.block_shape, self.dtype = tuple(block_shape), dtype
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.value_bytes = value_bytes(self.block_shape, dtype)  # every value is exactly this long
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # lookups, hits, misses, bytes_read, writes, bytes_written, dropped
        self.errors: Counter[str] = Counter()  # by kind: unreachable, timeout, io, corrupt
        self._logged: set[str] = set()
        self._down_until = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_blocks)
        self._writer = threading.Thread(target=self._write_loop, name="kvcache-tier-writer", daemon=True)
        self._writer.start()
        self._closed = False
        atexit.register(self.close)  # what is queued is written before the process ends

    @property
    def url(self) -> str:
        return self.backend.url

    def key(self, block_hash: int) -> str:
        """The backend key of the block with this chained hash under this model's fingerprint."""
        return f"kvcache-{self.fingerprint}-{block_hash & 0xFFFF_FFFF_FFFF_FFFF:016x}"

    # -- reads ---------------------------------------------------------------------------
    def fetch(self, hashes: Sequence[int], token_chunks: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K and V (L, Hkv, block_size, D) of the longest leading run of these blocks (chained
        hashes and their token ids) the tier holds, read within the time bound. Never raises."""
        if not hashes:
            return []
        self._add(lookups=1)
        if time.monotonic() < self._down_until:
            self._add(misses=len(hashes))
            return []
        try:
            values = self.backend.get_many([self.key(h) for h in hashes], time.monotonic() + self.timeout_s)
        except TierUnavailable as exc:
            self._failed(exc.kind, str(exc), rest=True)
            self._add(misses=len(hashes))
            return []
        except Exception as exc:  # a lookup must never fail a request
            self._failed("io", f"a lookup in {self.url} failed ({type(exc).__name__}: {exc})", rest=True)
            self._add(misses=len(hashes))
            return []
        out = []
        for value, tokens in zip(values, token_chunks):
            if value is None:
                break
            try:
                out.append(decode_block(value, self.block_shape, self.dtype, tokens))
            except TierValueError as exc:
                self._failed("corrupt", f"a value of {self.url} was refused: {exc}")
                break
            self._add(bytes_read=len(value))
        self._add(hits=len(out), misses=len(hashes) - len(out))
        return out

    # -- writes --------------------------------------------------------------------------
    def offer(self, block_hash: int, token_ids: Sequence[int],
              read: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Queue a block for writing; `read()` copies its K and V out of the pool (called only
        when there is room). False, counted as dropped, when the queue is full or the tier rests."""
        if self._queue.full() or time.monotonic() < self._down_until:
            self._add(dropped=1)
            return False
        k, v = read()
        try:
            self._queue.put_nowait((block_hash, tuple(token_ids), k, v))
        except queue.Full:
            self._add(dropped=1)
            return False
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued block was written (or failed); False on timeout."""
        end = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > end:
                return False
            time.sleep(0.002)
        return True

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if time.monotonic() < self._down_until:
                    self._add(dropped=1)
                    continue
                block_hash, tokens, k, v = item
                value = encode_block(k, v, tokens)
                try:
                    self.backend.put(self.key(block_hash), value)
                except TierUnavailable as exc:
                    self._failed(exc.kind, str(exc), rest=True)
                    continue
                self._add(writes=1, bytes_written=len(value))
            except Exception as exc:  # the writer must outlive any one bad block
                self._failed("io", f"writing a block to {self.url} failed ({type(exc).__name__}: {exc})")
            finally:
                self._queue.task_done()

    def close(self) -> None:
        """Write what is queued (for a few seconds at most), stop the writer, close the backend."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout_s=5.0)
        self._queue.put(None)
        self._writer.join(timeout=5.0)
        self.backend.close()

    # -- counters ------------------------------------------------------------------------
    def _add(self, **counts: int) -> None:
        with self._lock:
            self.counts.update(counts)

    def _failed(self, kind: str, message: str, rest: bool = False) -> None:
        with self._lock:
            self.errors[kind] += 1
            first = kind not in self._logged
            self._logged.add(kind)
            if rest:
                self._down_until = time.monotonic() + self.retry_s
        if first:
            log.warning("KV tier %s: %s; treated as a miss (each kind of failure is logged once)", self.url, message)

    def stats(self) -> dict:
        """The tier's figures for `LLM.stats()` and `/metrics` (blocks and bytes)."""
        with self._lock:
            c, errors = dict(self.counts), dict(self.errors)
        hits, misses = c.get("hits", 0), c.get("misses", 0)
        return {
            "kv_tier": self.url,
            "kv_tier_lookups": c.get("lookups", 0),
            "kv_tier_hits": hits,
            "kv_tier_misses": misses,
            "kv_tier_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "kv_tier_bytes_read": c.get("bytes_read", 0),
            "kv_tier_writes": c.get("writes", 0),
            "kv_tier_bytes_written": c.get("bytes_written", 0),
            "kv_tier_dropped_writes": c.get("dropped", 0),
            "kv_tier_errors": sum(errors.values()),
            "kv_tier_errors_by_kind": errors,
            "kv_tier_stored_bytes": self.backend.stored_bytes(),
            "kv_tier_value_bytes": self.value_bytes,
        }
