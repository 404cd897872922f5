"""A throwaway `redis-server` (Debian's package) on a free 127.0.0.1 port: no persistence,
bounded by `maxmemory` with LRU eviction. The KV tier's benchmarks and tests start one each."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from kvcache.bench.serve import free_port
from kvcache.errors import KVCacheError


def redis_server_binary() -> str | None:
    """The `redis-server` on PATH, or None."""
    return shutil.which("redis-server")


class RedisServer:
    """One redis-server process: `start()` waits until it answers PING, `stop()` ends it (also a
    context manager). Its files go to `folder`, or to a temporary folder removed by `stop()`."""

    def __init__(self, folder: Path | None = None, maxmemory: str = "64mb"):
        self.own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="kvcache-redis-")) if folder is None else folder
        self.port, self.maxmemory = free_port(), maxmemory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> "RedisServer":
        cmd = [redis_server_binary() or "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
               "--save", "", "--appendonly", "no", "--maxmemory", self.maxmemory,
               "--maxmemory-policy", "allkeys-lru", "--dir", str(self.folder), "--daemonize", "no",
               "--loglevel", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            try:
                if self.client().ping():
                    return self
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)
        self.stop()
        raise KVCacheError(f"redis-server did not answer on port {self.port}.")

    def stop(self) -> None:
        """End the server (killed if it does not exit within 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def values(self) -> tuple[int, int, set[int]]:
        """(keys, their values' total bytes, the distinct value lengths)."""
        c = self.client()
        keys = list(c.scan_iter(count=1000))
        lengths = [c.strlen(k) for k in keys]
        return len(keys), sum(lengths), set(lengths)
