"""int8 weights rounded against calibration activations, so that a projection's rounding errors
cancel in its outputs instead of adding up (error-compensated rounding, after GPTQ: Frantar et
al., 2022).

Rounding each weight to its nearest int8 step (`weight_packing.quantize_int8`) ignores what the
weight multiplies. Here a projection's inputs X over a few hundred calibration tokens give
H = X^T X; the weight's columns are rounded one at a time, and each column's rounding error,
carried through the Cholesky factor of H^-1, is spread over the columns not yet rounded, so
that the output error ||(W - Q) X^T|| becomes small rather than each weight's own. The format is
unchanged: symmetric int8, one scale per output row (max|w| / 127).

A model loaded so holds each projection as a `PendingProjection` (its float matrices' handles:
a `LazyMatrix` reads one only when asked) and `recalibrate` runs it once over the calibration
tokens. Each projection, when the forward reaches it, sees its inputs through the projections
rounded before it, rounds its float weights against them and hands on its new output: one float
matrix and one H are resident at a time, and no nearest-rounded copy is ever built.

The calibration text is the docstrings of a fixed list of standard-library modules (prose that
ships with the interpreter, apart from the eval corpus); under `python -OO`, which strips them,
`calibration_ids` is empty and int8 keeps rounding to nearest.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import warnings
from functools import lru_cache

import torch

from kvcache.models.heap import return_freed_memory
from kvcache.models.quantization import ACTIVATION_DIGITS
from kvcache.models.quantized_linear import QuantizedLinear
from kvcache.models.weight_packing import BLOCK, PackedWeight, pack_i8
from kvcache.native import qlinear

#: Tokens the calibration forward runs over (H of a 1,536-input projection is damped where they
#: fall short of its rank).
CALIBRATION_TOKENS = 512
#: Modules whose docstrings make up the calibration text, in this order.
CALIBRATION_MODULES = ("argparse", "collections", "typing", "asyncio", "json", "re", "subprocess", "logging",
                       "unittest", "decimal", "datetime", "itertools", "functools", "pathlib", "threading",
                       "socket", "email.message", "http.client", "tarfile", "zipfile")
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # a layer's projections (`LayerWeights`)
_COLUMNS_AT_ONCE = 128  # columns whose errors are carried within a block before the rest is updated
_DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps H invertible


@lru_cache(maxsize=1)
def calibration_text() -> str:
    """The docstrings (over 200 characters) of `CALIBRATION_MODULES` and their public classes and functions."""
    docs: list[str] = []
    with warnings.catch_warnings():  # reading some members (typing.io, ...) warns of their removal
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in CALIBRATION_MODULES:
            mod = importlib.import_module(name)
            for obj in [mod, *(getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_"))]:
                if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
                    doc = inspect.getdoc(obj)
                    if doc and len(doc) > 200:
                        docs.append(doc)
    return "\n\n".join(dict.fromkeys(docs))


def calibration_ids(tokenizer, n: int = CALIBRATION_TOKENS) -> list[int]:
    """The first `n` token ids of `calibration_text()` (fewer where it is shorter; empty where Python
    runs without docstrings). Only a prefix of the text is tokenized: ~8 characters per token
    asked for, more if that falls short."""
    text, chars = calibration_text(), 8 * n
    while True:
        # verbose=False: no warning that the prefix is longer than the model's context
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= n or chars >= len(text):
            return list(ids[:n])
        chars *= 2


def rounding_tag(quantization: str, ids: list[int] | None) -> str:
    """The weights' quantization as their values depend on it: under "int8" the activation digits
    and the calibration tokens (a digest; "nearest" without), e.g. "int8(digits=2,calibration=1f0c..)".
    What a KV cache kept beyond one process is keyed by."""
    if quantization != "int8":
        return quantization
    cal = hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16] if ids else "nearest"
    return f"int8(digits={ACTIVATION_DIGITS['int8']},calibration={cal})"


def inverse_factor(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For H = X^T X (K, K): the upper triangular U with U^T U = H'^-1, where H' is H with its
    unseen inputs made unit and its diagonal damped until it factors, and those unseen inputs
    (K,) bool. One Cholesky factorization of H' reversed (P H' P = M M^T, P the reversal) and one
    triangular inverse: U = P M^-1 P. At most four (K, K) matrices are alive at once."""
    hr = h.float().flip(0, 1)  # (K, K) P H P, a copy
    diag = hr.diagonal()  # (K,) view, in reversed order
    dead = diag == 0  # inputs never seen: their weights do not matter
    diag[dead] = 1.0
    damp = _DAMP * float(diag.mean())
    diag += damp
    for _ in range(6):
        low, info = torch.linalg.cholesky_ex(hr)  # (K, K) M
        if int(info) == 0:
            del hr
            inverse = torch.linalg.solve_triangular(low, torch.eye(h.shape[0]), upper=False)  # (K, K) M^-1
            del low
            return inverse.flip(0, 1).contiguous(), dead.flip(0)  # row-major, as the native loop reads it
        diag += 9 * damp  # ten times the damping
        damp *= 10
    raise RuntimeError("the calibration inputs' Gram matrix did not factor even with damping.")


def round_int8_compensated(w: torch.Tensor, u: torch.Tensor, dead: torch.Tensor) -> PackedWeight:
    """w (N, K) float -> "i8" tiles (scale max|w| / 127 per row), rounded column by column with each
    column's error carried onto the columns after it; u, dead: `inverse_factor` of the inputs' H."""
    wt = w.float().t().contiguous()  # (K, N): a column of w per row, updated as errors are carried
    k, n = wt.shape
    wt[dead] = 0.0
    scale = wt.abs().amax(0) / 127  # (N,)
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))  # (N,)
    codes = torch.zeros(-(-k // BLOCK) * BLOCK, n, dtype=torch.int8)  # (Kp, N)
    kern = qlinear.kernels()
    q = torch.empty(n)  # (N,)
    for c0 in range(0, k, _COLUMNS_AT_ONCE):
        c1 = min(k, c0 + _COLUMNS_AT_ONCE)
        block = wt[c0:c1]  # (C, N) view
        errors = torch.empty(c1 - c0, n)  # (C, N)
        if kern is not None:  # the same loop in C
            kern.round_block(block, u[c0:c1, c0:], scale, inv, codes[c0:c1], errors)
        else:
            for j in range(c1 - c0):
                torch.mul(block[j], inv, out=q).round_().clamp_(-127, 127)  # (N,)
                codes[c0 + j] = q
                e = errors[j]
                torch.sub(block[j], q * scale, out=e).div_(u[c0 + j, c0 + j])  # (N,)
                block[j + 1:].addr_(u[c0 + j, c0 + j + 1: c1], e, alpha=-1.0)
        wt[c1:].addmm_(u[c0:c1, c1:].t(), errors, alpha=-1.0)
    codes = codes.t().contiguous()  # (N, Kp)
    return pack_i8(codes, scale, k)


def _float_matrix(m) -> torch.Tensor:
    """A state dict's matrix (a tensor, or a `LazyMatrix` read whole here) in float32: (N, K)."""
    return m.float() if isinstance(m, torch.Tensor) else m[0:m.shape[0]].float()


class PendingProjection:
    """An int8 projection not rounded yet: its float parts (out, in), rounded on its first call
    against that call's inputs (the calibration forward's), after which `recalibrate` puts the
    packed projection in its place. No nearest-rounded copy is ever built beside it."""

    def __init__(self, parts: list, bias: torch.Tensor | None, dtype: torch.dtype, activation_digits: int):
        self.parts, self.bias, self.dtype, self.activation_digits = parts, bias, dtype, activation_digits
        self.rounded: QuantizedLinear | None = None
        self.on_rounded = None  # called once rounded (a progress bar's step)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rounded is not None:  # called again before `recalibrate` put it in place
            return self.rounded(x)
        x2 = x.reshape(-1, x.shape[-1]).float()  # (T, K)
        u, dead = inverse_factor(x2.T @ x2)  # (K, K), (K,)
        packed = [round_int8_compensated(_float_matrix(p), u, dead) for p in self.parts]
        self.rounded = QuantizedLinear(packed, self.bias, self.dtype, self.activation_digits)
        self.parts = []
        return_freed_memory()  # this projection's float temporaries
        if self.on_rounded is not None:
            self.on_rounded()
        return self.rounded(x)


def recalibrate(model, ids: list[int], progress: bool = False) -> None:
    """Round `model`'s `PendingProjection`s against its own activations over `ids`, in place: one
    forward, in which each projection rounds itself against its inputs through the projections
    rounded before it. `progress`: a bar over the projections."""
    from rich.progress import Progress

    from kvcache.models.step import StepInputs

    pending = [(lw, attr) for lw in model.layers for attr in PROJECTIONS
               if isinstance(getattr(lw, attr), PendingProjection)]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"int8: rounding against {len(ids)} calibration tokens", total=len(pending))
        for lw, attr in pending:
            getattr(lw, attr).on_rounded = lambda: bar.advance(task)
        with torch.inference_mode():
            model.forward(StepInputs(torch.tensor([ids]), None, 0, None, "last"), None)
    for lw, attr in pending:
        rounded = getattr(lw, attr).rounded
        if rounded is None:
            raise RuntimeError(f"the calibration forward did not reach a layer's {attr} projection.")
        setattr(lw, attr, rounded)
