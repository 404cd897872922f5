"""Compile `kernels.c` once per machine with the system C compiler and load it with ctypes.

The shared object is cached under `cache_home()/native/`, named by a hash of the source,
the flags and the compiler's version, so an edit or a new machine triggers a rebuild. A
machine without a compiler (or `KVCACHE_NATIVE=0`) gets None, and callers use torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _target(cc: str) -> Path:
    from kvcache.models.loader import cache_home

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    return cache_home() / "native" / f"kernels-{digest}.so"


def compile_to(cc: str, flags: list[str], out: Path) -> None:
    """Compile `kernels.c` with these flags into the shared object `out` (raises on failure)."""
    proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")


def build() -> Path:
    """Compile the kernels if needed; return the shared object's path (raises on failure)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    target = _target(cc)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        compile_to(cc, FLAGS, Path(tmp))
        os.replace(tmp, target)  # atomic: concurrent builders agree on one file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when unavailable or disabled."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("KVCACHE_NATIVE", "1") != "0":
            try:
                import torch  # noqa: F401  (its libgomp must be loaded first, so both share one OpenMP runtime)

                _lib = ctypes.CDLL(str(build()))
            except Exception as exc:  # a missing compiler is not an error: torch ops take over
                warnings.warn(f"kvcache native kernels unavailable, using torch ops ({exc})", RuntimeWarning,
                              stacklevel=2)
                _lib = None
        _tried = True
        return _lib
