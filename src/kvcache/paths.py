"""Where kvcache keeps files it derives once and reuses (converted models, compiled kernels).

`$KVCACHE_HOME`, else `$XDG_CACHE_HOME/kvcache`, else `~/.cache/kvcache`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """Where dequantized models and other derived files are cached."""
    if os.environ.get("KVCACHE_HOME"):
        return Path(os.environ["KVCACHE_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvcache"
