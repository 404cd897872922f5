"""What a tier key's model part stands for: every input the K/V bytes of a block depend on.

Two engines share blocks only when their fingerprints match: the weights (a digest of the
weight files' sizes, headers and bytes sampled through them: cheap, and any retrained or
re-quantized file changes it), the model config, the dtype, the weights' quantization (int8's
with its activation digits and calibration tokens: `LLM.weights_key`), the
matmul kernels, the KV policy and the block storage format (block size, K/V shape, format
version). The chained block hash then names the block within that model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from kvcache.cache.tier.codec import FORMAT_VERSION

__all__ = ["weights_digest", "tier_fingerprint"]

_HEAD = 1 << 20  # the first MiB (a safetensors / GGUF header and the first tensors)
_SAMPLES = 64  # then this many 4 KiB windows spread through the file
_WINDOW = 4096


def weights_digest(files: Iterable[str | Path]) -> str:
    """A digest of weight files: names, sizes, the first MiB and 64 windows through each."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(p) for p in files):
        size = os.path.getsize(path)
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(_HEAD))
            if size > _HEAD:
                step = (size - _HEAD) // _SAMPLES
                for i in range(_SAMPLES):
                    f.seek(_HEAD + i * step)
                    h.update(f.read(_WINDOW))
    return h.hexdigest()


def tier_fingerprint(weights: str, config: str, dtype: str, quantization: str, kernels: str, policy: str,
                     block_shape: tuple[int, int, int, int]) -> str:
    """32 hex characters naming one model's blocks: every argument is part of it."""
    parts = (f"tier-format={FORMAT_VERSION}", f"weights={weights}", f"config={config}", f"dtype={dtype}",
             f"quantization={quantization}", f"kernels={kernels}", f"policy={policy}",
             "block=" + "x".join(str(s) for s in block_shape))
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()
