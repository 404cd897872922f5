"""Chained block hashes: the keys of the prefix cache.

A block's K/V depend on every token before it, not only on its own tokens, so the key of
block i is a hash of (key of block i-1, token ids of block i, optional extra key). Two
sequences that share their first n full blocks therefore share the first n keys, and a
cache hit on block i implies the whole prefix up to and including block i matches
(up to a 64-bit hash collision, which the block pool guards against by also comparing the
token ids of the block it returns).

The hash is `hashlib.blake2b` over a fixed little-endian byte encoding, truncated to
64 bits: stable across processes and runs (never Python's randomised `hash()`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from kvcache.errors import KVCacheError

__all__ = ["hash_block"]

_DIGEST_BYTES = 8  # 64-bit block hashes


def _encode_extra(extra: object) -> bytes:
    """A stable, type-tagged byte encoding of the optional extra key."""
    if extra is None:
        return b"N"
    if isinstance(extra, bytes):
        return b"B" + extra
    if isinstance(extra, str):
        return b"S" + extra.encode("utf-8")
    if isinstance(extra, bool):  # before int: bool is an int subclass
        return b"T" if extra else b"F"
    if isinstance(extra, int):
        return b"I" + str(extra).encode("ascii")
    # tuples / frozen dataclasses of str, int, float, ...: their repr is stable across runs.
    return b"R" + repr(extra).encode("utf-8")


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra: object = None) -> int:
    """The 64-bit key of a full block of `token_ids` whose preceding block has key
    `parent_hash` (None for the first block). `extra` (e.g. a model or policy fingerprint)
    separates caches that must not share blocks; it must have a stable `repr`."""
    n = len(token_ids)
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    if parent_hash is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + (parent_hash & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
    h.update(n.to_bytes(4, "little"))  # token count frames the variable-length part
    h.update(struct.pack(f"<{n}q", *token_ids))  # 8 bytes per token id
    h.update(_encode_extra(extra))
    return int.from_bytes(h.digest(), "little")
