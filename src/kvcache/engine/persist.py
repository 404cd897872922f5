"""Saving and restoring conversations' KV caches (file format in `cache/snapshot.py`).

- `SessionStore`: named snapshot files in one folder (names validated: no path tricks).
- The engine's one session path: `snapshot_prefix` reads the cached blocks of a token prefix,
  `restore_prefix` writes a snapshot's full blocks into free blocks and registers their
  chained hashes, so the next request with that prefix is a prefix-cache hit. The server
  calls them on the engine's thread (`AsyncEngine.call`), `ChatSession.snapshot` / `restore`
  (the CLI chat's /save and /load) directly.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from kvcache.cache.snapshot import CacheFingerprint, KVSnapshot, load_snapshot, read_metadata, save_snapshot
from kvcache.errors import KVCacheError

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SESSION_NAME_RULE = "1-64 letters, digits, '-' or '_', starting with a letter or digit"
SUFFIX = ".safetensors"


def fingerprint(llm) -> CacheFingerprint:
    """The fingerprint of the K/V this `LLM` computes: model name, config hash, dtype, KV policy and
    the weights' quantization (`LLM.weights_key`)."""
    config = json.dumps(asdict(llm.config), sort_keys=True, default=str)
    return CacheFingerprint(model=str(llm.name), config_hash=hashlib.sha256(config.encode()).hexdigest()[:16],
                            dtype=str(llm.dtype).removeprefix("torch."), policy=llm.kv_policy.canonical,
                            weights=llm.weights_key)


def kv_shape(llm) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the model's K/V."""
    c = llm.config
    return c.num_layers, c.num_kv_heads, c.head_dim


def default_sessions_dir() -> Path:
    return Path.home() / ".cache" / "kvcache" / "sessions"


def check_session_name(name: str) -> str:
    """`name` if it is a valid session name, else a `KVCacheError` saying what is allowed."""
    if not isinstance(name, str) or not SESSION_NAME.match(name):
        raise KVCacheError(f"Invalid session name {name!r}: use {SESSION_NAME_RULE}.")
    return name


@dataclass
class SessionInfo:
    """One saved session, as listed."""

    name: str
    num_tokens: int
    bytes: int
    created: float
    model: str
    dtype: str
    compatible: bool  # saved for this model, dtype and policy


class SessionStore:
    """Snapshot files `<folder>/<name>.safetensors`, checked against one model's fingerprint."""

    def __init__(self, folder: str | Path, llm):
        self.folder = Path(folder)
        self.fingerprint = fingerprint(llm)
        self.shape = kv_shape(llm)

    def path(self, name: str) -> Path:
        return self.folder / f"{check_session_name(name)}{SUFFIX}"

    def save(self, name: str, snap: KVSnapshot) -> int:
        """Write the snapshot under `name` (replacing one of that name); returns its size in bytes."""
        return save_snapshot(self.path(name), snap)

    def load(self, name: str) -> KVSnapshot:
        """The checked snapshot saved under `name` (missing, corrupt or foreign: `KVCacheError`)."""
        path = self.path(name)
        if not path.is_file():
            raise SessionNotFoundError(f"No saved session named '{name}'.")
        return load_snapshot(path, self.fingerprint, self.shape)

    def list(self) -> list[SessionInfo]:
        """Every readable snapshot in the folder, by name (unreadable files are skipped)."""
        out = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []:
            if not SESSION_NAME.match(path.stem):
                continue
            try:
                meta = read_metadata(path)
            except (KVCacheError, OSError):
                continue
            fp = meta["fingerprint"]
            out.append(SessionInfo(path.stem, meta["num_tokens"], meta["bytes"], meta["created"], fp.model,
                                   fp.dtype, fp.mismatch(self.fingerprint) is None))
        return out


class SessionNotFoundError(KVCacheError):
    """No snapshot of that name."""


# -- the engine's prefix cache (the server calls these on the engine thread) -----------------
def snapshot_prefix(engine, token_ids: list[int], fp: CacheFingerprint,
                    messages: list[dict] | None = None) -> KVSnapshot | None:
    """The K/V of the full blocks of `token_ids` if the prefix cache holds all of them, else None."""
    bs = engine.kv.block_size
    n_full = len(token_ids) // bs
    blocks = engine.kv.cached_prefix_blocks(token_ids)
    if n_full == 0 or len(blocks) < n_full:
        return None
    k, v = engine.storage.read_blocks(blocks, n_full * bs)
    return KVSnapshot(fp, list(token_ids[: n_full * bs]), k, v, messages)


def restore_prefix(engine, snap: KVSnapshot) -> tuple[int, int]:
    """Write the snapshot's full blocks into the prefix cache; (blocks written, already cached)."""
    bs = engine.kv.block_size

    def write(block_ids: list[int], first: int) -> None:
        lo, hi = first * bs, (first + len(block_ids)) * bs
        engine.storage.write_blocks(block_ids, snap.k[:, :, lo:hi], snap.v[:, :, lo:hi])

    return engine.kv.restore_prefix(snap.token_ids, write)
