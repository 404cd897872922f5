"""KV snapshots on disk: one conversation's K/V as a safetensors file with a fingerprint.

File layout (safetensors, so any safetensors reader can open it):

- tensors ``k`` and ``v``: (num_layers, num_kv_heads, num_tokens, head_dim) in the cache dtype;
  ``token_ids``: (num_tokens,) int64, the tokens whose K/V these are, in order;
- metadata (strings): ``format`` (``kvcache-session/1``), ``fingerprint`` (JSON: model name,
  config hash, dtype, KV policy, weights), ``sha256`` over token ids + K + V bytes, ``num_tokens``,
  ``created`` (unix time) and ``messages`` (JSON list of chat messages, or ``null``).

Loading checks everything (header, shapes, dtype, checksum, fingerprint) before returning, so
a caller never writes a half-valid snapshot into a cache. The engine writes and reads this one
format for the server and the CLI chat alike (see `engine/persist.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvcache.errors import KVCacheError

__all__ = ["FORMAT", "CacheFingerprint", "KVSnapshot", "SnapshotError", "read_metadata", "save_snapshot",
           "load_snapshot"]

FORMAT = "kvcache-session/1"
_MAX_HEADER = 1 << 24  # a larger header is not one we wrote


class SnapshotError(KVCacheError):
    """A snapshot file that cannot be used: corrupt, truncated, or made for another model."""


@dataclass(frozen=True)
class CacheFingerprint:
    """What K/V values depend on: the model (name and config), the dtype, the KV policy and the
    weights' quantization (a file written before it was recorded has "" and matches none)."""

    model: str
    config_hash: str
    dtype: str
    policy: str = ""
    weights: str = ""

    def describe(self) -> str:
        extra = f", policy {self.policy}" if self.policy else ""
        extra += f", {self.weights} weights" if self.weights else ""
        return f"model '{self.model}' ({self.dtype}{extra})"

    def mismatch(self, other: "CacheFingerprint") -> str | None:
        """A sentence naming the first difference from `other`, or None when they match."""
        for name in ("model", "config_hash", "dtype", "policy", "weights"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                what = {"config_hash": "model config", "weights": "weights' quantization"}.get(name, name)
                return f"it was saved for {self.describe()}, and its {what} differs from this {other.describe()}"
        return None


@dataclass
class KVSnapshot:
    """A conversation's K/V: k and v are (num_layers, num_kv_heads, num_tokens, head_dim)."""

    fingerprint: CacheFingerprint
    token_ids: list[int]
    k: torch.Tensor
    v: torch.Tensor
    messages: list[dict] | None = None
    created: float = field(default_factory=time.time)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _checksum(token_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (token_ids, k, v):
        h.update(t.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def save_snapshot(path: str | Path, snap: KVSnapshot) -> int:
    """Write `snap` to `path` atomically (a temporary file renamed into place); returns its size."""
    from safetensors.torch import save

    if snap.k.shape != snap.v.shape or snap.k.dim() != 4 or snap.k.shape[2] != snap.num_tokens:
        raise ValueError(f"k {tuple(snap.k.shape)} and v {tuple(snap.v.shape)} do not hold {snap.num_tokens} tokens.")
    ids = torch.tensor(snap.token_ids, dtype=torch.int64)
    k, v = snap.k.detach().cpu().contiguous(), snap.v.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "fingerprint": json.dumps(asdict(snap.fingerprint), sort_keys=True),
        "sha256": _checksum(ids, k, v),
        "num_tokens": str(snap.num_tokens),
        "created": repr(snap.created),
        "messages": json.dumps(snap.messages),
    }
    data = save({"token_ids": ids, "k": k, "v": v}, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


def _header(data: bytes, name: str) -> dict:
    if len(data) < 8:
        raise SnapshotError(f"The session file {name} is truncated (no header).")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise SnapshotError(f"The session file {name} is truncated or corrupt (bad header length).")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        raise SnapshotError(f"The session file {name} is corrupt (unreadable header).") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SnapshotError(f"The file {name} is not a kvcache session ({FORMAT}).")
    return meta


def _fingerprint(meta: dict, name: str) -> CacheFingerprint:
    try:
        return CacheFingerprint(**json.loads(meta["fingerprint"]))
    except (KeyError, TypeError, ValueError):
        raise SnapshotError(f"The session file {name} has no valid fingerprint.") from None


def read_metadata(path: str | Path) -> dict:
    """The header of a snapshot (no tensors read): fingerprint, num_tokens, created, bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        data = head + f.read(min(n, _MAX_HEADER))
    meta = _header(data, path.name)
    return {"fingerprint": _fingerprint(meta, path.name), "num_tokens": int(meta.get("num_tokens", 0)),
            "created": float(meta.get("created", 0)), "bytes": path.stat().st_size}


def load_snapshot(path: str | Path, expected: CacheFingerprint | None = None,
                  shape: tuple[int, int, int] | None = None) -> KVSnapshot:
    """Read and fully check a snapshot. `expected`: refuse one made for another model, dtype
    or policy; `shape`: (num_layers, num_kv_heads, head_dim) the K/V must have. Raises
    `SnapshotError` (one sentence) for anything wrong; the caller's cache is never touched."""
    from safetensors.torch import load

    path = Path(path)
    name = path.name
    data = path.read_bytes()
    meta = _header(data, name)
    fp = _fingerprint(meta, name)
    if expected is not None and (why := fp.mismatch(expected)):
        raise SnapshotError(f"The session {path.stem} cannot be loaded here: {why}.")
    try:
        tensors = load(data)
        ids, k, v = tensors["token_ids"], tensors["k"], tensors["v"]
        messages = json.loads(meta.get("messages", "null"))
        created = float(meta.get("created", 0))
    except Exception:  # safetensors raises its own error types for a damaged body
        raise SnapshotError(f"The session file {name} is truncated or corrupt.") from None
    t = ids.shape[0] if ids.dim() == 1 else -1
    if t < 1 or k.dim() != 4 or k.shape != v.shape or k.shape[2] != t or str(meta.get("num_tokens")) != str(t):
        raise SnapshotError(f"The session file {name} is corrupt (inconsistent tensor shapes).")
    if shape is not None and (k.shape[0], k.shape[1], k.shape[3]) != tuple(shape):
        raise SnapshotError(f"The session file {name} holds K/V of shape {tuple(k.shape)}, not this model's.")
    if str(k.dtype).removeprefix("torch.") != fp.dtype or ids.dtype != torch.int64:
        raise SnapshotError(f"The session file {name} is corrupt (its dtype is not the one it claims).")
    if _checksum(ids, k, v) != meta.get("sha256"):
        raise SnapshotError(f"The session file {name} is corrupt (checksum mismatch).")
    if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
        raise SnapshotError(f"The session file {name} is corrupt (bad messages).")
    return KVSnapshot(fp, ids.tolist(), k, v, messages, created)
