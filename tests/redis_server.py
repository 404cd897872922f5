"""What the KV tier's tests need beside `kvcache.bench.redis_server.RedisServer`: why a test skips
without redis-server, and a port that accepts connections but never answers (a hung server)."""

from __future__ import annotations

import socket

SKIP_REASON = ("redis-server is not installed (Debian package redis-server; "
               "`bash scripts/ensure_redis.sh` installs it)")


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
