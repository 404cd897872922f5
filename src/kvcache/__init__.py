"""kvcache: an LLM inference engine built around an explicit, measurable KV cache.

The names below load on first use, so that a module that needs no torch (the single-user
runtime `kvcache.solo`, the memory arithmetic) imports none.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"LLM": "kvcache.api.llm", "RequestMetrics": "kvcache.engine.outputs",
            "RequestOutput": "kvcache.engine.outputs", "SamplingParams": "kvcache.engine.sampling",
            "KVCacheError": "kvcache.errors"}
__all__ = ["LLM", "KVCacheError", "RequestMetrics", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvcache' has no attribute {name!r}")
