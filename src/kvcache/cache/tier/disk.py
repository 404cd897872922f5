"""`DiskTier`: tier values as files in one folder, with its own LRU bound by bytes.

A value is the file `<folder>/<key>.kvb`, written to a temporary name and renamed (a reader
never sees half a value). Recency is the file's mtime: a hit touches it, and a process
starting on the folder rebuilds its LRU index from the mtimes, so the cache survives restarts.
When the folder's files pass `max_bytes`, the least recently used ones are deleted. Several
processes may share the folder; each bounds the files it knows of (those present when it
started and those it wrote or read since).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from kvcache.cache.tier.backend import TierUnavailable

__all__ = ["DiskTier"]

SUFFIX = ".kvb"


class DiskTier:
    """Files by key in `folder`, at most `max_bytes` of them (None: no bound)."""

    def __init__(self, folder: str | Path, max_bytes: int | None = None):
        self.folder = Path(folder)
        self.url = f"disk:{self.folder}"
        self.max_bytes = max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lru: OrderedDict[str, int] = OrderedDict()  # key -> file bytes, least recently used first
        self._bytes = 0
        self.evicted = 0  # files deleted for the byte bound
        self._lock = threading.Lock()  # the engine thread reads, the tier's writer thread writes
        found = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except OSError:
                continue
            found.append((st.st_mtime_ns, path.name[: -len(SUFFIX)], st.st_size))
        for _, key, size in sorted(found):
            self._lru[key] = size
            self._bytes += size
        self._evict()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def get_many(self, keys: Sequence[str], deadline: float) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            if time.monotonic() > deadline:
                raise TierUnavailable("timeout", "reading the disk tier took longer than the time bound")
            try:
                value = self.path(key).read_bytes()
            except FileNotFoundError:
                self._forget(key)
                out.append(None)
                break
            except OSError as exc:
                raise TierUnavailable("io", f"reading {self.path(key)} failed ({exc.strerror or exc})") from None
            try:
                os.utime(self.path(key))  # a hit is a use: recency survives restarts
            except OSError:
                pass
            self._note(key, len(value))
            out.append(value)
        return out

    def put(self, key: str, value: bytes) -> None:
        if self.max_bytes is not None and len(value) > self.max_bytes:
            return  # could never stay
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(value)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise TierUnavailable("io", f"writing {path} failed ({exc.strerror or exc})") from None
        self._note(key, len(value))
        self._evict()

    def stored_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        pass

    def _note(self, key: str, size: int) -> None:
        with self._lock:
            self._bytes += size - self._lru.pop(key, 0)
            self._lru[key] = size

    def _forget(self, key: str) -> None:
        with self._lock:
            self._bytes -= self._lru.pop(key, 0)

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self.max_bytes is None or self._bytes <= self.max_bytes or not self._lru:
                    return
                key, size = self._lru.popitem(last=False)
                self._bytes -= size
                self.evicted += 1
            try:
                self.path(key).unlink()
            except FileNotFoundError:
                pass
            except OSError:
                pass  # left for a later process to try; no longer counted here
