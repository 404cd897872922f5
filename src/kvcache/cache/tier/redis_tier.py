"""`RedisTier`: tier values as Redis keys (Redis 7 or Valkey), one server reachable from every node.

The tier only sets and reads keys; the server's own bound does the eviction (run it with
`maxmemory` and `maxmemory-policy allkeys-lru`). A lookup is one MGET of the run's keys, one
round trip whose socket timeout is the time bound, so a slow or stopped server costs at most
that bound. The client (PyPI `redis`) is imported only when a Redis tier is opened.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kvcache.cache.tier.backend import TierUnavailable
from kvcache.errors import KVCacheError

__all__ = ["RedisTier"]


class RedisTier:
    """Values by key on the Redis server at `host:port`."""

    def __init__(self, host: str, port: int, timeout_s: float, db: int = 0, username: str | None = None,
                 password: str | None = None):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise KVCacheError("A Redis KV tier needs the redis client: pip install 'kvcache[tier]'.") from None
        self._errors = (redis.exceptions.RedisError, OSError)
        self._timeout_type, self._connection_type = redis.exceptions.TimeoutError, redis.exceptions.ConnectionError
        self.url = f"redis://{host}:{port}" + (f"/{db}" if db else "")
        self.timeout_s = timeout_s
        # the socket timeouts bound each call (connect and answer); no retries
        self._client = redis.Redis(host=host, port=port, db=db, username=username, password=password,
                                   socket_timeout=timeout_s,
                                   socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))

    def get_many(self, keys: Sequence[str], deadline: float) -> list[bytes | None]:
        if time.monotonic() > deadline:
            raise TierUnavailable("timeout", f"{self.url} was not asked: the time bound had passed")
        try:
            values = self._client.mget(list(keys))
        except self._errors as exc:
            raise TierUnavailable(self._kind(exc), f"{self.url}: {exc}") from None
        out: list[bytes | None] = []
        for value in values:
            out.append(value)
            if value is None:
                break
        return out

    def put(self, key: str, value: bytes) -> None:
        try:
            self._client.set(key, value)
        except self._errors as exc:
            raise TierUnavailable(self._kind(exc), f"{self.url}: {exc}") from None

    def _kind(self, exc: Exception) -> str:
        """timeout, unreachable (no connection, or refused credentials), or server (an error reply)."""
        if isinstance(exc, (self._timeout_type, TimeoutError)):
            return "timeout"
        return "unreachable" if isinstance(exc, (self._connection_type, OSError)) else "server"

    def stored_bytes(self) -> None:
        return None  # the server's, shared with others; see its INFO memory

    def close(self) -> None:
        self._client.close()
