"""Handing the heap's freed pages back to the OS while a model loads.

glibc keeps pages that `free` returns inside its heap; a load that builds matrix after matrix,
freeing each one's temporaries, would otherwise end with a peak (and a resident set) far above
what it keeps.
"""

from __future__ import annotations

import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (looked up once)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None) if libc is not None else None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim): loading frees the
    state dict's temporaries, which glibc would otherwise keep resident (about 60 MB for the
    default model's packed weights). A no-op where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
