"""Compile `kernels.c` (with `qlinear.c`, `decode_layers.c` and `round_compensated.c`) once per machine with the C compiler; load it with ctypes.

The shared object is cached under `cache_home()/native/`, named by a hash of the source,
the flags and the compiler's version, so an edit or a new machine triggers a rebuild. A
machine without a compiler (or `KVCACHE_NATIVE=0`) gets None, and callers use torch. A
compiler that rejects the source is a bug, not a missing feature: the build writes the
compiler's output to a log beside the cache, `load` warns in one line naming that log and
falls back to torch, and `tests/unit/test_native.py` fails with the compiler's message.
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
#: Compiled into the same library: the quantized-weight linear kernels and the fused decode layers.
EXTRA_SOURCES = tuple(Path(__file__).with_name(n) for n in ("qlinear.c", "decode_layers.c", "round_compensated.c"))
HEADERS = (Path(__file__).with_name("bf16.h"),)  # included by the sources: part of the cache key
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


class BuildError(RuntimeError):
    """The compiler rejected `kernels.c`; `log` holds its full output."""

    def __init__(self, message: str, log: Path):
        super().__init__(message)
        self.log = log


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def wanted() -> bool:
    """Whether this machine should run the native kernels: a C compiler and `KVCACHE_NATIVE` not 0."""
    return os.environ.get("KVCACHE_NATIVE", "1") != "0" and _compiler() is not None


def _target(cc: str) -> Path:
    from kvcache.paths import cache_home

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    code = b"".join(p.read_bytes() for p in (SOURCE, *EXTRA_SOURCES, *HEADERS))
    digest = hashlib.sha256(code + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    return cache_home() / "native" / f"kernels-{digest}.so"


def compile_to(cc: str, flags: list[str], out: Path, log: Path | None = None) -> None:
    """Compile `kernels.c` and the extra sources with these flags into the shared object `out`. On failure raise
    `BuildError` with the compiler's error lines, its whole output written to `log`
    (default: beside `out`)."""
    cmd = [cc, *flags, "-I", str(HEADERS[0].parent), str(SOURCE), *map(str, EXTRA_SOURCES), "-o", str(out), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        log = log or out.with_suffix(".log")
        log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}exit status {proc.returncode}\n")
        errors = [line for line in proc.stderr.splitlines() if "error:" in line] or proc.stderr.splitlines()
        raise BuildError(f"{cc} could not compile {SOURCE.name} (full output in {log}):\n"
                         + "\n".join(errors[:20]), log)


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
        compile_to(cc, FLAGS, Path(tmp), log=target.with_suffix(".log"))
        os.replace(tmp, target)  # atomic: concurrent builders agree on one file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(with_torch: bool = True) -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when unavailable or disabled.
    `with_torch` loads torch first, so that the library and torch share torch's OpenMP runtime; a
    process that never imports torch (`kvcache.solo`) passes False and the library binds the
    system's. The first call loads the library; later calls return it whatever they pass."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("KVCACHE_NATIVE", "1") != "0":
            try:
                if with_torch:
                    import torch  # noqa: F401  (its libgomp must be loaded first, so both share one OpenMP runtime)

                _lib = ctypes.CDLL(str(build()))
            except BuildError as exc:
                warnings.warn(f"kvcache native kernels failed to build, using torch ops; compiler output in "
                              f"{exc.log}", RuntimeWarning, stacklevel=2)
            except Exception as exc:  # no compiler, an unwritable cache: torch ops take over
                warnings.warn(f"kvcache native kernels unavailable, using torch ops ({exc})", RuntimeWarning,
                              stacklevel=2)
        _tried = True
        return _lib
