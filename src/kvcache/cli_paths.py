"""Output paths of the `kvcache` command, checked before any long work; OS errors as one sentence."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kvcache.errors import KVCacheError


def os_error_sentence(exc: OSError) -> str:
    """'Permission denied (out/x.png).' from an OSError, without the errno prefix."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{reason}{where}."


def _probe(folder: Path, flag: str, path: str) -> None:
    """Create and remove a file in `folder`: the one sure test that this process may write there."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise KVCacheError(f"{flag} {path}: cannot write in {folder}: {os_error_sentence(exc)}") from None


def check_output_file(path: str, flag: str) -> Path:
    """A file the command will write later: its folder must exist and be writable now."""
    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise KVCacheError(f"{flag} {path} is a folder; give a file name.")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise KVCacheError(f"{flag} {path}: the folder {folder} {what}.")
    _probe(folder, flag, path)
    return p


def check_output_dir(path: str, flag: str) -> Path:
    """A folder the command will create or fill later: fail now if it cannot be; creates nothing."""
    p = Path(path)
    existing = next((q for q in (p, *p.parents) if q.exists()), Path("."))
    if not existing.is_dir():
        raise KVCacheError(f"{flag} {path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KVCacheError(f"{flag} {path}: cannot write in {existing}.")
    return p


def prepare_output_dir(path: str, flag: str) -> Path:
    """Create the folder (and its parents) and prove it writable, just before the long work."""
    p = check_output_dir(path, flag)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KVCacheError(f"{flag} {path}: cannot create the folder: {os_error_sentence(exc)}") from None
    _probe(p, flag, path)
    return p
