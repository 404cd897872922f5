"""The shared KV block tier: full blocks written through to Redis or a disk folder, fetched on a
prefix-cache miss (see `tier.KVTier`). `open_backend` turns a `--kv-tier` URL into a backend."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from kvcache.cache.tier.backend import TierBackend, TierUnavailable
from kvcache.cache.tier.tier import KVTier
from kvcache.errors import KVCacheError

__all__ = ["KVTier", "TierBackend", "TierUnavailable", "open_backend", "TIER_URL_RULE"]

TIER_URL_RULE = "redis://HOST:PORT or disk:PATH"


def open_backend(url: str, timeout_s: float, max_bytes: int | None = None) -> TierBackend:
    """The backend a tier URL names (nothing is contacted yet); `KVCacheError` in one sentence
    for a URL of another form. `max_bytes` bounds a disk tier (Redis bounds itself). A Redis
    URL may carry `user:password@`; the backend's `url` (shown in logs and metrics) drops it."""
    if not isinstance(url, str) or not url:
        raise KVCacheError(f"kv_tier must be {TIER_URL_RULE}, got {url!r}.")
    if url.startswith("disk:"):
        path = url[len("disk:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise KVCacheError("kv_tier 'disk:' needs a folder, e.g. disk:/var/cache/kvcache-tier.")
        from kvcache.cache.tier.disk import DiskTier

        try:
            return DiskTier(Path(path).expanduser(), max_bytes)
        except OSError as exc:
            raise KVCacheError(f"The KV tier folder {path} cannot be used ({exc.strerror or exc}).") from None
    if url.startswith("redis://"):
        if max_bytes is not None:
            raise KVCacheError("kv_tier_max_bytes bounds a disk tier; bound a Redis server with its maxmemory.")
        parts = urlsplit(url)
        try:
            port = parts.port or 6379
        except ValueError:
            raise KVCacheError(f"kv_tier {url!r} has a bad port; use {TIER_URL_RULE}.") from None
        db = parts.path.strip("/")
        if not parts.hostname or (db and not db.isdigit()) or parts.query or parts.fragment:
            raise KVCacheError(f"kv_tier must be {TIER_URL_RULE} (optionally /DB), got {url!r}.")
        from kvcache.cache.tier.redis_tier import RedisTier

        return RedisTier(parts.hostname, port, timeout_s, int(db or 0), parts.username, parts.password)
    raise KVCacheError(f"kv_tier must be {TIER_URL_RULE}, got {url!r}.")
