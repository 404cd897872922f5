"""A throwaway `redis-server` on a free loopback port (no persistence, LRU-bounded), and a port
that accepts connections but never answers (a hung server)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from kvcache.bench.serve import free_port

SKIP_REASON = ("redis-server is not installed (Debian package redis-server; "
               "`bash scripts/ensure_redis.sh` installs it)")


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """One redis-server process: `start()` waits until it answers PING, `stop()` ends it."""

    def __init__(self, folder: Path, maxmemory: str = "64mb"):
        self.folder, self.maxmemory = folder, maxmemory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        cmd = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
               "--appendonly", "no", "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru",
               "--dir", str(self.folder), "--daemonize", "no", "--loglevel", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                if self.client().ping():
                    return self
            except Exception:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class SilentPort:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()
