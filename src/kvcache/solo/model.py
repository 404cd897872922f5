"""SoloModel: one sequence through a packed GGUF with the native kernels, on numpy arrays.

Every forward call runs all decoder layers in one native call (`dl_decode_layers`): a decode
step is one row; a prompt chunk is many rows of the same sequence, each attending to the
positions up to its own (the K/V of the whole chunk is written before any row attends), so
the weights stream once per chunk. K/V live in float32 arrays (L, Hkv, capacity, D) allocated
zeroed at the full context: the pages of positions never reached are never touched.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import sys
from pathlib import Path

import numpy as np

from kvcache.errors import KVCacheError, ModelFormatError
from kvcache.models.config import LlamaConfig
from kvcache.native import build
from kvcache.native.signatures import KERNELS, declare, declare_qlinear
from kvcache.solo.weights import SoloWeights

#: Rows of a prompt run through the layers at once: the weights stream once per chunk.
PROMPT_CHUNK = 256


def _p(a: np.ndarray) -> int:
    return a.ctypes.data


def native_library() -> ctypes.CDLL:
    """The native library with the functions the runtime calls declared; a clear error without it."""
    lib = build.load(with_torch=False)
    if lib is None or not hasattr(lib, "dl_decode_layers"):
        raise KVCacheError("the solo runtime needs the native kernels, which are not built here (a C compiler, "
                           "and KVCACHE_NATIVE not 0).")
    declare_qlinear(lib)
    for name in ("rms_norm", "argmax_rows"):
        declare(getattr(lib, f"{name}_f32"), KERNELS[name])
    return lib


def rope_tables(head_dim: int, theta: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin (length, D) float32 in the rotate-half convention (`models.rope`). The
    frequencies and angles equal the engine's bit for bit (a float64 power rounded to float32, as
    torch computes it); their cos and sin, computed in float64 and rounded once, differ from torch's
    float32 ones by at most one unit in the last place."""
    exponent = (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)).astype(np.float64)
    inv = np.float32(1.0) / (np.float64(theta) ** exponent).astype(np.float32)  # (D/2,)
    freqs = np.outer(np.arange(length, dtype=np.float32), inv).astype(np.float64)  # (length, D/2)
    cos, sin = np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([cos, cos], 1)), np.ascontiguousarray(np.concatenate([-sin, sin], 1))


#: mmap's MAP_NORESERVE on Linux (Python 3.11 names no constant for it): no commit charge up front.
_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0


def _untouched_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros in fresh private anonymous pages, reserved without a commit charge and never
    backed by huge pages: a page is resident once written, so K/V sized for the whole context
    costs what its filled positions hold (with transparent huge pages each layer's and head's
    first write would fault in 2 MB)."""
    count = int(np.prod(shape))
    pages = mmap.mmap(-1, max(count * 4, 1), flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(pages, np.float32, count).reshape(shape)


class SoloModel:
    """A loaded model and the K/V of its one sequence (`length` positions filled)."""

    def __init__(self, weights: SoloWeights, lib: ctypes.CDLL, max_len: int | None = None):
        c = self.config = weights.config
        self.weights, self.lib = weights, lib
        self.max_len = min(max_len or c.max_position_embeddings, c.max_position_embeddings)
        self.cos = self.sin = np.empty((0, c.head_dim), np.float32)  # (positions, D), grown on demand
        shape = (c.num_layers, c.num_kv_heads, self.max_len, c.head_dim)
        self.k = _untouched_zeros(shape)  # (L, Hkv, max_len, D)
        self.v = _untouched_zeros(shape)
        self.tokens: list[int] = []  # the sequence whose K/V the arrays hold
        self.high_water = 0  # the most positions ever written: the K/V pages resident

    @property
    def length(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_gguf(cls, path: Path, config: LlamaConfig, max_len: int | None = None) -> "SoloModel":
        lib = native_library()
        return cls(SoloWeights.load(path, config, lib.dl_fields()), lib, max_len)

    @classmethod
    def from_folder(cls, path: Path, meta: Path, max_len: int | None = None) -> "SoloModel":
        """The GGUF at `path` with the config.json of its converted folder `meta`."""
        try:
            config = LlamaConfig.from_hf(json.loads((meta / "config.json").read_text()))
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"Could not read the config of {path.name} in {meta} ({exc}).") from None
        return cls.from_gguf(path, config, max_len)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (a conversation's turns keep their common prefix)."""
        del self.tokens[length:]

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        e = self.weights.embed
        x = np.empty((len(ids), e.in_features), np.float32)  # (T, H)
        self.lib.ql_dequantize(e.address, e.code, e.in_features, e.out_features, _p(ids), len(ids), _p(x), 0)
        return x

    def _rope_up_to(self, end: int) -> None:
        """RoPE tables covering positions 0..end-1 (doubling, up to the context)."""
        if end > self.cos.shape[0]:
            self.cos, self.sin = rope_tables(self.config.head_dim, self.config.rope_theta,
                                             min(self.max_len, max(end, 2 * self.cos.shape[0], 1024)))

    def _layers(self, x: np.ndarray, start: int) -> None:
        """Every decoder layer on x (T, H) in place, for positions start..start+T-1."""
        c, t = self.config, x.shape[0]
        self._rope_up_to(start + t)
        pos = np.arange(start, start + t, dtype=np.int64)  # (T,)
        table = np.zeros((t, 1), np.int32)  # one block holding the whole context
        lo = np.zeros(t, np.int64)
        hi = pos + 1
        self.lib.dl_decode_layers(_p(x), _p(self.weights.layers), c.num_layers, t, c.hidden_size, c.num_heads,
                                  c.num_kv_heads, c.head_dim, c.intermediate_size, c.rms_norm_eps,
                                  c.head_dim ** -0.5, _p(self.cos), _p(self.sin), _p(pos), _p(self.k), _p(self.v),
                                  self.k.strides[0] // 4, self.k.strides[1] // 4, _p(pos), _p(table), _p(lo), _p(hi),
                                  1, self.max_len, 0)

    def forward(self, ids: list[int], every: bool = False) -> np.ndarray:
        """Append `ids` to the sequence; the logits (V,) float32 after its last token, or with
        `every` after each of its tokens (T, V) (perplexity)."""
        if not ids:
            raise KVCacheError("forward needs at least one token.")
        if self.length + len(ids) > self.max_len:
            raise KVCacheError(f"the sequence would hold {self.length + len(ids)} tokens, past the context of "
                               f"{self.max_len}.")
        tokens = np.asarray(ids, dtype=np.int64)
        if tokens.min() < 0 or tokens.max() >= self.weights.embed.out_features:
            raise KVCacheError(f"token ids must be in 0..{self.weights.embed.out_features - 1}.")
        out = []
        for i in range(0, len(tokens), PROMPT_CHUNK):
            x = self._embed(tokens[i:i + PROMPT_CHUNK])  # (T, H)
            self._layers(x, self.length)
            self.tokens += tokens[i:i + PROMPT_CHUNK].tolist()
            self.high_water = max(self.high_water, self.length)
            if every:
                out.append(self._logits(x))
        return np.concatenate(out) if every else self._logits(x[-1:])[0]

    def token_losses(self, ids: list[int]) -> np.ndarray:
        """Append `ids`; the negative log-likelihood (len(ids) - 1,) float64 of each of its tokens
        after the first, predicted from the ones before (perplexity = exp(mean)). Runs a prompt
        chunk at a time, so the logits held are one chunk's."""
        if len(ids) < 2:
            raise KVCacheError("token_losses needs at least two tokens.")
        losses = []
        for i in range(0, len(ids), PROMPT_CHUNK):
            logits = self.forward(ids[i:i + PROMPT_CHUNK], every=True).astype(np.float64)  # (T, V)
            target = np.asarray(ids[i + 1:i + 1 + PROMPT_CHUNK], dtype=np.int64)  # (T or T-1,)
            logits = logits[:len(target)]
            top = logits.max(1, keepdims=True)
            losses.append(np.log(np.exp(logits - top).sum(1)) + top[:, 0] - logits[np.arange(len(target)), target])
        return np.concatenate(losses)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """x (R, H) after the last layer -> logits (R, V)."""
        c, head, rows = self.config, self.weights.head, x.shape[0]
        h = np.empty_like(x)  # (R, H)
        self.lib.rms_norm_f32(_p(x), _p(self.weights.final_norm), _p(h), rows, c.hidden_size, c.rms_norm_eps)
        logits = np.empty((rows, head.out_features), np.float32)  # (R, V)
        self.lib.ql_matmul(_p(h), head.address, _p(logits), rows, head.in_features, head.out_features,
                           head.out_features, head.code, 1, 0)
        return logits

    def argmax(self, logits: np.ndarray) -> int:
        """The first index of the largest logit (the kernels' argmax, as the engine's greedy step)."""
        out = np.empty(1, np.int64)
        self.lib.argmax_rows_f32(_p(logits), _p(out), 1, logits.shape[-1])
        return int(out[0])

    def kv_bytes(self, positions: int | None = None) -> int:
        """Bytes of K/V `positions` positions hold (default: the sequence's)."""
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * (self.length if positions is None else positions)
