"""KIVI-style asymmetric integer quantization of KV tensors, really packed.

Tensors are (B, Hkv, S, D). A value becomes a code in [0, 2^b - 1] (b = 8, 4 or 2) and
codes are packed into uint8 along head_dim: 1, 2 or 4 codes per byte, in planes (see
:func:`pack_codes`). Each group carries a fp16 scale and a fp16 zero point (``spec.INT_SCALE_BYTES``)
and dequantizes as ``x_hat = code * scale + zero``. Two grouping axes (KIVI):

- ``"channel"`` (keys): a group is ``group_size`` consecutive tokens of one channel;
  ``scale``/``zero`` are (B, Hkv, S / group_size, D). Tokens arrive one at a time, so a
  :class:`QuantizedBuffer` takes whole groups of tokens and the caller (a policy) keeps the
  not-yet-full group exact.
- ``"token"`` (values): a group is ``group_size`` consecutive channels of one token;
  ``scale``/``zero`` are (B, Hkv, S, D / group_size). Any number of tokens can be appended.

Error bound. The zero point is the group minimum rounded *down* to fp16 and the scale is
``(max - zero) / (2^b - 1)`` rounded *up* to fp16, so the whole group lies inside
``[zero, zero + (2^b - 1) * scale]`` and round-to-nearest guarantees, per element,

    |x - x_hat| <= scale / 2            (scale = the stored fp16 scale of its group)

up to float32 arithmetic rounding (:func:`error_bound` adds 2^-21 of the magnitudes
involved) and, for a bfloat16 output, bfloat16 rounding of ``x_hat``. The stored scale is within about two fp16 ulps of the ideal (max - min) / (2^b - 1):

    scale <= (max - min + ulp16(min)) / (2^b - 1) * (1 + 2^-10) + 2^-24

A constant group gets scale 0 (or one tiny ulp when its value is not a fp16 number) and
no NaN or inf. Values beyond the fp16 range (|x| > 65504) saturate near +-65504.

Rotation (``rotation=R``, a (D, D) orthonormal matrix; the 2-bit value default of the
policies, see :func:`hadamard`). Per-token groups of a value vector quantize ``x @ R``
instead of ``x``: the rotation spreads an outlier channel over all channels, so the group
range shrinks. :func:`dequantize` multiplies back by ``R^T``; the bound above then holds for
the rotated vector (and so for the vector's Euclidean error, R being orthonormal).

Clipping (``clip=True``, the 2-bit default of the policies). With four levels, one outlier
stretches a group's range and wastes them on the rest. A clipped quantizer tries the group's
range shrunk about its centre by each factor in ``CLIP_FACTORS`` (1.0 included) and keeps
the one with the least squared error over the group; values outside the chosen range
saturate at its ends. The bound above then holds inside the chosen range only; what is
guaranteed is that each group's squared error is at most the unclipped quantizer's. On the
default model this takes int2 (g32, residual 128) from +19.5% to +7.5% perplexity at 1k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvcache.cache.spec import INT_SCALE_BYTES, QUANT_AXES
from kvcache.errors import KVCacheError

__all__ = [
    "BITS",
    "QTensor",
    "quantize",
    "dequantize",
    "error_bound",
    "quantized_scores",
    "pack_codes",
    "unpack_codes",
    "QuantizedBuffer",
    "LayerBitsBuffer",
    "layer_store",
    "rotated",
]

def hadamard(n: int) -> torch.Tensor | None:
    """The (n, n) orthonormal Walsh-Hadamard matrix (symmetric, its own inverse), or None when
    n is not a power of two."""
    if n < 1 or n & (n - 1):
        return None
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5  # (n, n)


#: Range factors a clipped quantizer tries per group (1.0: the plain min-max range).
CLIP_FACTORS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)

#: Supported code widths.
BITS: tuple[int, ...] = (8, 4, 2)
_FP16_MAX = 65504.0
_META_DTYPE = torch.float16
assert 2 * torch.finfo(_META_DTYPE).bits // 8 == INT_SCALE_BYTES  # scale + zero per group


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _check_format(bits: int, group_size: int, axis: str, head_dim: int) -> None:
    if bits not in BITS:
        raise KVCacheError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise KVCacheError(f"group_size must be a positive integer, got {group_size!r}.")
    if axis not in QUANT_AXES:
        raise KVCacheError(f"axis must be one of {', '.join(QUANT_AXES)}, got {axis!r}.")
    if (head_dim * bits) % 8:
        raise KVCacheError(f"head_dim {head_dim} does not pack into whole bytes at {bits} bits.")
    if axis == "token" and head_dim % group_size:
        raise KVCacheError(
            f"group_size {group_size} must divide head_dim {head_dim} for per-token groups."
        )


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise KVCacheError("Expected a floating-point tensor of shape (batch, kv_heads, seq, head_dim).")


# --------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (..., D) into (..., Dp = D * bits / 8) bytes, plane by plane.

    Code d sits in byte ``d % Dp`` at bit ``(d // Dp) * bits``: unpacking plane i is one
    shift and mask of whole 8-byte words, written to the contiguous codes d in
    [i * Dp, (i + 1) * Dp).
    """
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], per, codes.shape[-1] // per)  # (..., per, Dp)
    packed = c[..., 0, :].clone()
    for i in range(1, per):  # at most 3 planes, not a loop over data
        packed |= c[..., i, :] << (i * bits)
    return packed  # (..., Dp)


def _words(data: torch.Tensor) -> torch.Tensor:
    """``data`` seen as int64 words when its layout allows (8x fewer elements), else as is."""
    if data.shape[-1] % 8 == 0:
        try:
            return data.view(torch.int64)
        except RuntimeError:  # strides or offset not word-aligned
            pass
    return data


def unpack_codes(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (..., Dp) bytes -> (..., Dp * 8 / bits) uint8 codes."""
    if bits == 8:
        return data
    per, Dp = 8 // bits, data.shape[-1]
    codes = torch.empty(*data.shape[:-1], per, Dp, dtype=torch.uint8, device=data.device)
    src = _words(data)  # (..., Dp / 8) int64 or (..., Dp) uint8
    dst = codes.view(src.dtype)  # (..., per, Dp / 8 or Dp)
    mask = int.from_bytes(bytes([(1 << bits) - 1]) * src.element_size(), "little")
    for i in range(per):  # one shift and mask per plane
        torch.bitwise_and(src >> (i * bits), mask, out=dst[..., i, :])
    return codes.view(*data.shape[:-1], per * Dp)  # (..., D)


# --------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class QTensor:
    """A quantized (B, Hkv, S, D) tensor: packed codes plus per-group fp16 scale and zero."""

    data: torch.Tensor  # (B, Hkv, S, D * bits / 8) uint8
    scale: torch.Tensor  # (B, Hkv, S / g, D) per channel | (B, Hkv, S, D / g) per token, fp16
    zero: torch.Tensor  # same shape as scale, fp16
    shape: tuple[int, int, int, int]
    bits: int
    group_size: int
    axis: str
    rotation: torch.Tensor | None = None  # (D, D) orthonormal: the codes hold x @ R; dequantize undoes it

    @property
    def nbytes(self) -> int:
        """Exact stored bytes: packed codes plus scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))


def _grouped(x: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """View (B, H, S, D) as groups: (B, H, S/g, g, D) per channel, (B, H, S, D/g, g) per token."""
    B, H, S, D = x.shape
    if axis == "channel":
        return x.view(B, H, S // group_size, group_size, D)
    return x.view(B, H, S, D // group_size, group_size)


def _meta_grouped(m: torch.Tensor, axis: str) -> torch.Tensor:
    """Scale/zero with a size-1 axis where the group's elements are, to broadcast over them."""
    return m.unsqueeze(3) if axis == "channel" else m.unsqueeze(-1)


def _fp16_toward(t: torch.Tensor, up: bool) -> torch.Tensor:
    """Round fp32 ``t`` to fp16 toward +inf (``up``) or -inf, so the result bounds ``t``."""
    h = t.to(_META_DTYPE)
    wrong = h.float() < t if up else h.float() > t
    target = torch.full((), float("inf") if up else float("-inf"), dtype=_META_DTYPE, device=t.device)
    return torch.where(wrong, torch.nextafter(h, target), h)


def _range_params(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int, dim: int,
                  with_error: bool):
    """fp16 zero and scale covering [lo, hi], the fp32 codes of the grouped x, and (if asked)
    the squared error per group (summed over `dim`)."""
    z16 = _fp16_toward(lo, up=False)  # zero <= lo
    s16 = _fp16_toward((hi - z16.float()) / levels, up=True)  # zero + levels*scale >= hi
    s, z = s16.float(), z16.float()
    inv = torch.reciprocal(s).nan_to_num_(posinf=0.0)  # a constant group has scale 0
    codes = (xg - z).mul_(inv).round_().clamp_(0, levels)  # (x - zero) / scale; subtract first (no cancellation)
    err = (codes * s + z - xg).square_().sum(dim=dim, keepdim=True) if with_error else None
    return z16, s16, codes, err


def _quantize_into(x: torch.Tensor, bits: int, group_size: int, axis: str,
                   data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, clip: bool = False) -> None:
    """Quantize x (B, H, S, D) into preallocated (possibly sliced) data/scale/zero."""
    levels = (1 << bits) - 1
    xg = _grouped(x.float().contiguous(), group_size, axis)  # grouped view, fp32
    dim = 3 if axis == "channel" else 4
    lo, hi = torch.aminmax(xg, dim=dim, keepdim=True)
    lo = lo.clamp_(-_FP16_MAX, _FP16_MAX)
    hi = hi.clamp_(-_FP16_MAX, _FP16_MAX)
    z16, s16, codes, err = _range_params(xg, lo, hi, levels, dim, clip)
    if clip:
        mid = (lo + hi) / 2
        for factor in CLIP_FACTORS[1:]:  # keep, per group, the range with the least error
            z2, s2, c2, e2 = _range_params(xg, mid - factor * (mid - lo), mid + factor * (hi - mid), levels, dim,
                                          True)
            better = e2 < err
            err = torch.where(better, e2, err)
            z16, s16 = torch.where(better, z2, z16), torch.where(better, s2, s16)
            codes = torch.where(better, c2, codes)
    data.copy_(pack_codes(codes.to(torch.uint8).view(x.shape), bits))  # (B, H, S, D) codes, packed
    scale.copy_(s16.squeeze(dim))
    zero.copy_(z16.squeeze(dim))


def rotated(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """x (..., D) @ rotation in fp32, or x itself."""
    return x if rotation is None else x.float() @ rotation.to(x.device, torch.float32)


def _meta_shape(shape: tuple[int, ...], group_size: int, axis: str) -> tuple[int, int, int, int]:
    B, H, S, D = shape
    return (B, H, S // group_size, D) if axis == "channel" else (B, H, S, D // group_size)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: str, clip: bool = False,
             rotation: torch.Tensor | None = None) -> QTensor:
    """Quantize x (B, Hkv, S, D) to ``bits`` with groups of ``group_size`` along ``axis``.

    ``axis="channel"`` needs S to be a multiple of group_size, ``"token"`` needs D to be.
    ``clip``: choose each group's range by least squared error; ``rotation``: quantize
    ``x @ rotation`` (see the module docstring).
    """
    _check_input(x)
    B, H, S, D = x.shape
    _check_format(bits, group_size, axis, D)
    if axis == "channel" and S % group_size:
        raise KVCacheError(
            f"Per-channel quantization needs a multiple of group_size {group_size} tokens, got {S}."
        )
    data = torch.empty((B, H, S, D * bits // 8), dtype=torch.uint8, device=x.device)
    meta = _meta_shape(x.shape, group_size, axis)
    scale = torch.empty(meta, dtype=_META_DTYPE, device=x.device)
    zero = torch.empty(meta, dtype=_META_DTYPE, device=x.device)
    _quantize_into(rotated(x, rotation), bits, group_size, axis, data, scale, zero, clip)
    return QTensor(data, scale, zero, (B, H, S, D), bits, group_size, axis, rotation)


def dequantize(q: QTensor, out: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize ``q`` to (B, Hkv, S, D), into ``out`` when given (any strides, its dtype).

    ``out`` lets the attention path reuse one scratch buffer (a slice of it works too);
    without it a new tensor of ``dtype`` is returned.
    """
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.data.device)
    elif tuple(out.shape) != tuple(q.shape) or not out.is_floating_point():
        raise KVCacheError(
            f"The output buffer must be a floating-point tensor of shape {tuple(q.shape)}, "
            f"got {out.dtype} {tuple(out.shape)}."
        )
    if out.dtype != torch.float32 or q.rotation is not None:
        # mixed uint8/fp32 -> bf16 arithmetic takes a slow scalar path on CPU (10-20x);
        # fp32 then one cast is fast and rounds x_hat once
        x = dequantize(replace(q, rotation=None))  # (B, H, S, D) fp32, rotated space
        return out.copy_(x if q.rotation is None else x @ q.rotation.T.to(x))
    codes = unpack_codes(q.data, q.bits)  # (B, H, S, D) uint8
    scale = _meta_grouped(q.scale.float(), q.axis)
    zero = _meta_grouped(q.zero.float(), q.axis)
    out_g = _grouped(out, q.group_size, q.axis)
    if q.axis == "token":
        # addcmul broadcasting along the innermost axis is ~3x slower on CPU than these
        # three vectorised passes
        out.copy_(codes)
        out_g.mul_(scale).add_(zero)
    else:
        torch.addcmul(zero, _grouped(codes, q.group_size, q.axis), scale, out=out_g)
    return out


def error_bound(q: QTensor, x: torch.Tensor) -> torch.Tensor:
    """Largest |x - dequantize(q)| guaranteed per element of x (B, Hkv, S, D), in fp32.

    scale / 2 of the element's group, plus 2^-21 of the magnitudes that float32 arithmetic
    rounds (|x|, |zero| and levels * scale).
    """
    levels = (1 << q.bits) - 1
    s = _meta_grouped(q.scale.float(), q.axis)
    z = _meta_grouped(q.zero.float(), q.axis)
    xg = _grouped(x.float().contiguous(), q.group_size, q.axis)
    bound = s / 2 + 2.0**-21 * (xg.abs() + z.abs() + levels * s)
    return bound.reshape(x.shape)


def quantized_scores(query: torch.Tensor, k: QTensor,
                     codes_out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention scores q @ K^T (B, Hkv, Tq, S) straight from per-channel quantized keys.

    K = code * scale + zero per group of g tokens, so for each group
    q @ K^T = (q * scale) @ code^T + q @ zero: the scale multiplies the Tq queries instead
    of the S x D keys. The codes still become floats (``codes_out``, (B, Hkv, S, D) of the
    query's dtype, can be a reused scratch buffer); no scaling by 1/sqrt(D) here.
    """
    if k.axis != "channel":
        raise KVCacheError("Scores from quantized keys need keys quantized per channel.")
    B, H, S, D = k.shape
    if query.dim() != 4 or tuple(query.shape[:2]) != (B, H) or query.shape[3] != D:
        raise KVCacheError(f"Expected a query of shape ({B}, {H}, Tq, {D}), got {tuple(query.shape)}.")
    g, ng, tq = k.group_size, S // k.group_size, query.shape[2]
    if codes_out is None:
        codes_out = torch.empty(k.shape, dtype=query.dtype, device=query.device)
    codes_out.copy_(unpack_codes(k.data, k.bits))  # (B, H, S, D) codes as floats
    codes = codes_out.view(B, H, ng, g, D)
    qs = query.unsqueeze(2) * k.scale.to(query.dtype).unsqueeze(3)  # (B, H, NG, Tq, D)
    main = torch.matmul(qs, codes.transpose(-1, -2))  # (B, H, NG, Tq, g)
    bias = torch.matmul(query, k.zero.to(query.dtype).transpose(-1, -2))  # (B, H, Tq, NG)
    main += bias.transpose(-1, -2).unsqueeze(-1)  # broadcast over the group's g tokens
    return main.transpose(2, 3).reshape(B, H, tq, S)  # (B, H, Tq, S)


# --------------------------------------------------------------------------
# Appendable per-layer store
# --------------------------------------------------------------------------


class QuantizedBuffer:
    """Quantized K or V of every layer, preallocated and written in place.

    Storage: codes (L, B, Hkv, cap, D * bits / 8) uint8 and scale/zero in fp16, per channel
    (L, B, Hkv, cap / g, D) or per token (L, B, Hkv, cap, D / g). Each layer counts its own
    tokens (layers append one after the other within a step). Capacity doubles when a layer
    outgrows it, so appends are amortised O(1) and no append concatenates the history.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, bits: int,
                 group_size: int, axis: str, capacity_tokens: int = 0,
                 device: torch.device | str = "cpu", clip: bool = False,
                 rotation: torch.Tensor | None = None):
        for name, value in (("num_layers", num_layers), ("batch", batch),
                            ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise KVCacheError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(capacity_tokens, bool) or not isinstance(capacity_tokens, int) \
                or capacity_tokens < 0:
            raise KVCacheError(f"capacity_tokens must be a non-negative integer, got {capacity_tokens!r}.")
        _check_format(bits, group_size, axis, head_dim)
        self.num_layers, self.batch, self.kv_heads, self.head_dim = num_layers, batch, kv_heads, head_dim
        self.bits, self.group_size, self.axis, self.clip = bits, group_size, axis, clip
        self.device = torch.device(device)
        self.rotation = None if rotation is None else rotation.to(self.device, torch.float32)  # (D, D)
        self._lengths = [0] * num_layers
        self._alloc(self._round_capacity(max(capacity_tokens, group_size)))

    # ---- storage

    def _round_capacity(self, n: int) -> int:
        g = self.group_size if self.axis == "channel" else 1
        return -(-n // g) * g

    def _alloc(self, capacity: int) -> None:
        lead = (self.num_layers, self.batch, self.kv_heads)
        meta = (self.num_layers,) + _meta_shape(
            (self.batch, self.kv_heads, capacity, self.head_dim), self.group_size, self.axis)
        self._data = torch.empty(lead + (capacity, self.head_dim * self.bits // 8),
                                 dtype=torch.uint8, device=self.device)  # (L, B, H, cap, Dp)
        self._scale = torch.empty(meta, dtype=_META_DTYPE, device=self.device)  # (L, B, H, G..)
        self._zero = torch.empty(meta, dtype=_META_DTYPE, device=self.device)  # (L, B, H, G..)

    @property
    def capacity(self) -> int:
        """Tokens each layer can hold before the storage grows."""
        return self._data.shape[3]

    def reserve(self, num_tokens: int) -> None:
        """Make room for at least ``num_tokens`` tokens per layer (capacity at least doubles)."""
        if num_tokens <= self.capacity:
            return
        old = (self._data, self._scale, self._zero)
        held = max(self._lengths)
        meta_held = held // self.group_size if self.axis == "channel" else held
        self._alloc(self._round_capacity(max(num_tokens, 2 * self.capacity)))
        self._data[:, :, :, :held] = old[0][:, :, :, :held]
        self._scale[:, :, :, :meta_held] = old[1][:, :, :, :meta_held]
        self._zero[:, :, :, :meta_held] = old[2][:, :, :, :meta_held]

    def _meta_index(self, n: int) -> int:
        return n // self.group_size if self.axis == "channel" else n

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise KVCacheError(f"layer must be in [0, {self.num_layers}), got {layer!r}.")

    # ---- API

    def num_tokens(self, layer: int = 0) -> int:
        """Tokens stored in ``layer``."""
        self._check_layer(layer)
        return self._lengths[layer]

    def append(self, layer: int, x: torch.Tensor) -> None:
        """Quantize x (B, Hkv, T, D) and store it after the layer's tokens.

        Per channel, T must be a multiple of group_size (whole groups); per token, any T.
        """
        self._check_layer(layer)
        _check_input(x)
        B, H, T, D = x.shape
        if (B, H, D) != (self.batch, self.kv_heads, self.head_dim):
            raise KVCacheError(
                f"Expected a tensor of shape ({self.batch}, {self.kv_heads}, T, {self.head_dim}), "
                f"got {tuple(x.shape)}."
            )
        if self.axis == "channel" and T % self.group_size:
            raise KVCacheError(
                f"Per-channel keys are appended in whole groups of {self.group_size} tokens, got {T}."
            )
        n = self._lengths[layer]
        self.reserve(n + T)
        m0, m1 = self._meta_index(n), self._meta_index(n + T)
        _quantize_into(rotated(x.to(self.device), self.rotation), self.bits, self.group_size, self.axis,
                       self._data[layer, :, :, n:n + T], self._scale[layer, :, :, m0:m1],
                       self._zero[layer, :, :, m0:m1], self.clip)
        self._lengths[layer] = n + T

    def append_all(self, x: torch.Tensor) -> None:
        """Quantize x (L, B, Hkv, T, D), one slice per layer, in one pass (layers equally long)."""
        n = self._lengths[0]
        assert all(m == n for m in self._lengths), "append_all needs layers of equal length"
        L, B, H, T, D = x.shape
        self.reserve(n + T)
        m0, m1 = self._meta_index(n), self._meta_index(n + T)
        _quantize_into(rotated(x.reshape(L * B, H, T, D), self.rotation), self.bits, self.group_size, self.axis,
                       self._data[:, :, :, n:n + T].flatten(0, 1), self._scale[:, :, :, m0:m1].flatten(0, 1),
                       self._zero[:, :, :, m0:m1].flatten(0, 1), self.clip)
        self._lengths = [n + T] * self.num_layers

    def drop_front(self, num_tokens: int) -> None:
        """Forget the oldest ``num_tokens`` tokens of every layer (per channel: whole groups)."""
        if self.axis == "channel" and num_tokens % self.group_size:
            raise KVCacheError(
                f"Per-channel keys can only be dropped in multiples of group_size {self.group_size}, "
                f"got {num_tokens}."
            )
        n = max(self._lengths)
        m0, m1 = self._meta_index(num_tokens), self._meta_index(n)
        for t, a, b in ((self._data, num_tokens, n), (self._scale, m0, m1), (self._zero, m0, m1)):
            t[:, :, :, : b - a] = t[:, :, :, a:b].clone()
        self._lengths = [max(0, m - num_tokens) for m in self._lengths]

    def view(self, layer: int) -> QTensor:
        """The layer's stored tokens as a :class:`QTensor` (views, no copy)."""
        self._check_layer(layer)
        n = self._lengths[layer]
        m = self._meta_index(n)
        return QTensor(self._data[layer, :, :, :n], self._scale[layer, :, :, :m],
                       self._zero[layer, :, :, :m], (self.batch, self.kv_heads, n, self.head_dim),
                       self.bits, self.group_size, self.axis, self.rotation)

    def dequantize_into(self, layer: int, out: torch.Tensor, start: int = 0) -> int:
        """Write the layer's n tokens into out[:, :, start:start + n] (B, Hkv, >= start + n, D); return n."""
        q = self.view(layer)
        n = q.shape[2]
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[2] < start + n \
                or isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise KVCacheError(
                f"The output buffer must be (batch, kv_heads, >= {n} + start, head_dim) with start >= 0."
            )
        dequantize(q, out[:, :, start:start + n])
        return n

    def truncate(self, num_tokens: int, layer: int | None = None) -> None:
        """Keep only the first ``num_tokens`` tokens of ``layer`` (every layer when None)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise KVCacheError(f"num_tokens must be a non-negative integer, got {num_tokens!r}.")
        if self.axis == "channel" and num_tokens % self.group_size:
            raise KVCacheError(
                f"Per-channel keys can only be cut at a multiple of group_size {self.group_size}, "
                f"got {num_tokens}."
            )
        layers = range(self.num_layers) if layer is None else [layer]
        for i in layers:
            self._check_layer(i)
            self._lengths[i] = min(self._lengths[i], num_tokens)

    def clear(self) -> None:
        """Drop every stored token (keeps the storage)."""
        self._lengths = [0] * self.num_layers

    @property
    def layer_bits(self) -> tuple[int, ...]:
        """Code width of each layer (all equal here; see :class:`LayerBitsBuffer`)."""
        return (self.bits,) * self.num_layers

    @property
    def nbytes(self) -> int:
        """Exact bytes of codes and metadata holding the stored tokens, all layers (what the
        layers' `view(...).nbytes` add up to, counted from their lengths: no views built)."""
        per_token = self._data[0, :, :, 0].numel() * self._data.element_size()  # B * Hkv * packed row
        per_meta = 2 * self._scale[0, :, :, 0].numel() * self._scale.element_size()  # a scale and a zero row
        return sum(n * per_token + self._meta_index(n) * per_meta for n in self._lengths)

    @property
    def nbytes_allocated(self) -> int:
        """Bytes reserved by the storage (the whole capacity)."""
        return sum(t.numel() * t.element_size() for t in (self._data, self._scale, self._zero))


class LayerBitsBuffer:
    """:class:`QuantizedBuffer`'s interface for layers of different code widths.

    ``layer_bits[i]`` is layer i's width; the layers of one width share one uniform
    :class:`QuantizedBuffer` (so each layer's storage really is packed at its own width),
    and this class maps a model layer to its store and row there.
    """

    def __init__(self, layer_bits, batch: int, kv_heads: int, head_dim: int, group_size: int, axis: str,
                 capacity_tokens: int = 0, device: torch.device | str = "cpu", clip: bool = False,
                 rotation: torch.Tensor | None = None):
        layer_bits = tuple(layer_bits)
        if not layer_bits:
            raise KVCacheError("layer_bits needs one width per layer, got none.")
        self.layer_bits, self.num_layers = layer_bits, len(layer_bits)
        self.group_size, self.axis, self.clip = group_size, axis, clip
        self._layers = {b: [i for i, x in enumerate(layer_bits) if x == b] for b in sorted(set(layer_bits))}
        self._stores = {b: QuantizedBuffer(len(ls), batch, kv_heads, head_dim, b, group_size, axis, capacity_tokens,
                                          device, clip, rotation) for b, ls in self._layers.items()}
        self._where = {i: (self._stores[b], j) for b, ls in self._layers.items() for j, i in enumerate(ls)}

    def _at(self, layer: int) -> tuple[QuantizedBuffer, int]:
        if isinstance(layer, bool) or layer not in self._where:
            raise KVCacheError(f"layer must be in [0, {self.num_layers}), got {layer!r}.")
        return self._where[layer]

    @property
    def capacity(self) -> int:
        """Tokens every layer can hold before some storage grows."""
        return min(s.capacity for s in self._stores.values())

    def reserve(self, num_tokens: int) -> None:
        for s in self._stores.values():
            s.reserve(num_tokens)

    def num_tokens(self, layer: int = 0) -> int:
        store, row = self._at(layer)
        return store.num_tokens(row)

    def append(self, layer: int, x: torch.Tensor) -> None:
        """Quantize x (B, Hkv, T, D) at the layer's width after its tokens."""
        store, row = self._at(layer)
        store.append(row, x)

    def append_all(self, x: torch.Tensor) -> None:
        """Quantize x (L, B, Hkv, T, D), one pass per width."""
        for b, layers in self._layers.items():
            part = x if len(layers) == self.num_layers else x[layers]  # (L_b, B, Hkv, T, D)
            self._stores[b].append_all(part)

    def drop_front(self, num_tokens: int) -> None:
        for s in self._stores.values():
            s.drop_front(num_tokens)

    def view(self, layer: int) -> QTensor:
        store, row = self._at(layer)
        return store.view(row)

    def dequantize_into(self, layer: int, out: torch.Tensor, start: int = 0) -> int:
        store, row = self._at(layer)
        return store.dequantize_into(row, out, start)

    def truncate(self, num_tokens: int, layer: int | None = None) -> None:
        if layer is None:
            for s in self._stores.values():
                s.truncate(num_tokens)
            return
        store, row = self._at(layer)
        store.truncate(num_tokens, row)

    def clear(self) -> None:
        for s in self._stores.values():
            s.clear()

    @property
    def nbytes(self) -> int:
        """Exact bytes of codes and metadata of the stored tokens, all widths."""
        return sum(s.nbytes for s in self._stores.values())

    @property
    def nbytes_allocated(self) -> int:
        return sum(s.nbytes_allocated for s in self._stores.values())


def layer_store(layer_bits, batch: int, kv_heads: int, head_dim: int, group_size: int, axis: str,
                capacity_tokens: int = 0, device: torch.device | str = "cpu", clip: bool = False,
                rotation: torch.Tensor | None = None) -> QuantizedBuffer | LayerBitsBuffer:
    """A store with layer i at ``layer_bits[i]`` bits: a plain :class:`QuantizedBuffer` when all are equal."""
    layer_bits = tuple(layer_bits)
    if len(set(layer_bits)) == 1:
        return QuantizedBuffer(len(layer_bits), batch, kv_heads, head_dim, layer_bits[0], group_size, axis,
                              capacity_tokens, device, clip, rotation)
    return LayerBitsBuffer(layer_bits, batch, kv_heads, head_dim, group_size, axis, capacity_tokens, device,
                          clip, rotation)
