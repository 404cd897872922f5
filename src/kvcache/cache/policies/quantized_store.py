"""Quantized and tiered stores for `SequenceCache` (same interface as `ExactStore`).

`QuantizedKVStore` (policy `quantized`, KIVI-style) keeps, in token order:
  [sinks: first n_sink tokens, exact] [quantized groups] [tail: the last residual..residual+g-1 tokens, exact]
Keys are quantized per channel and values per token (`cache/quant.py`, really packed);
new tokens land in the exact tail, and whole groups of `group_size` tokens move from
the tail into the quantized part once the tail passes `residual + group_size`.
With `key_axis=token` keys are grouped per token like the values, so tokens move one at a
time; with no exact tail and no sinks, a step's own tokens are also read quantized, the
numbers of the paged engine's quantized blocks (`cache/paged_quant.py`).

`TieredStore` (policy `tiered`, the hierarchical cache) adds a cold tier in front:
  [cold: oldest, on disk (memory-mapped) or dropped] [warm: quantized] [hot: exact]
with at most `warm` (+ one group) quantized tokens in memory.

Attention reads the whole history of a layer as floats assembled into one scratch
buffer shared by all layers (one layer's worth of floats, not a new tensor per step).
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from kvcache.cache.policies.params import QuantizerModes, quantizer_modes
from kvcache.cache.policies.stores import ExactStore
from kvcache.cache.quant import QTensor, dequantize, hadamard, layer_store, quantize
from kvcache.cache.spec import kv_layers_bytes
from kvcache.errors import KVCacheError


def value_group(group_size: int, head_dim: int) -> int:
    """Group size along head_dim for per-token values: group_size if it divides head_dim, else head_dim."""
    return group_size if group_size <= head_dim and head_dim % group_size == 0 else head_dim


class QuantizedKVStore:
    """Sinks exact + quantized middle + exact recent tail (see module docstring)."""

    kind = "quantized"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, bits: int, group_size: int,
                 residual: int, n_sink: int, dtype: torch.dtype, device: torch.device, capacity: int = 256,
                 exact_dtype: torch.dtype | None = None, clip: bool = False, value_group_size: int = 0,
                 rotate_values: bool = False, key_axis: str = "channel", rotate_keys: bool = False,
                 key_bits: tuple[int, ...] = (), value_bits: tuple[int, ...] = ()):
        """key_bits, value_bits: a width per layer (mixed precision by layer); () = `bits` everywhere."""
        L, H, D = num_layers, num_kv_heads, head_dim
        self.num_layers, self.num_kv_heads, self.head_dim = L, H, D
        self.bits, self.group_size, self.residual, self.n_sink = bits, group_size, residual, n_sink
        self.dtype, self.device = dtype, device  # dtype: what attention reads (the scratch)
        exact = exact_dtype or dtype  # what the exact sinks and tail are stored in
        self.sinks = ExactStore(L, 1, H, D, exact, device, max(n_sink, 1))
        self.tail = ExactStore(L, 1, H, D, exact, device, residual + group_size + 64)
        self.key_axis = key_axis
        # keys per channel: groups of group_size tokens; per token: group_size channels, like the values
        self.token_group = group_size if key_axis == "channel" else 1  # tokens that quantize together
        key_group = group_size if key_axis == "channel" else value_group(group_size, D)
        self.key_bits, self.value_bits = tuple(key_bits) or (bits,) * L, tuple(value_bits) or (bits,) * L
        self.qk = layer_store(self.key_bits, 1, H, D, key_group, key_axis, capacity, device, clip,
                              hadamard(D) if rotate_keys else None)
        self.qv = layer_store(self.value_bits, 1, H, D, value_group_size or value_group(group_size, D), "token",
                              capacity, device, clip, hadamard(D) if rotate_values else None)
        self.scratch_k = self.scratch_v = torch.empty(0, dtype=dtype, device=device)
        self.evict_unit = self.token_group  # drops move whole quantized groups
        # per-token keys with no exact tail: a step's own tokens are read as they will be stored
        # (quantized), like the paged quantized blocks, so the two give the same numbers
        self.quantize_staged = key_axis == "token" and residual == 0 and n_sink == 0

    @property
    def fused_decode(self) -> bool:
        """Whether decode attention can score from the codes (keys quantized per channel)."""
        return self.key_axis == "channel"

    # -- sizes --------------------------------------------------------------------------
    @property
    def num_quantized(self) -> int:
        return self.qk.num_tokens(0)

    @property
    def num_front(self) -> int:
        """Tokens before the quantized part (the sinks; a tiered store adds its cold tier)."""
        return self.sinks.length

    @property
    def length(self) -> int:
        return self.num_front + self.num_quantized + self.tail.length

    @property
    def layer_lengths(self) -> list[int]:
        """Tokens kept in each layer: as many in all."""
        return [self.length] * self.num_layers

    def reserve(self, n_tokens: int) -> None:
        self.tail.reserve(self.tail.length + (n_tokens - self.length))

    # -- the step -----------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.tail.append(layer, k, v)

    def _scratch(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scratch_k.numel() == 0 or self.scratch_k.shape[2] < s:
            cap = max(s, 2 * (self.scratch_k.shape[2] if self.scratch_k.numel() else 0))
            shape = (1, self.num_kv_heads, cap, self.head_dim)
            self.scratch_k = torch.empty(shape, dtype=self.dtype, device=self.device)  # (1, Hkv, cap, D)
            self.scratch_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self.scratch_k, self.scratch_v

    def front(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (1, Hkv, n, D) of the exact tokens before the quantized part (the sinks)."""
        return self.sinks.read(layer, 0)

    def _read_front(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        n = self.num_front
        if n:
            k[:, :, :n], v[:, :, :n] = self.front(layer)
        return n

    def read(self, layer: int, staged: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (1, Hkv, S, D) of `layer` assembled in the shared scratch buffer."""
        s = self.length + staged
        k, v = self._scratch(s)
        pos = self._read_front(layer, k, v)
        if self.num_quantized:
            self.qk.dequantize_into(layer, k, pos)
            pos += self.qv.dequantize_into(layer, v, pos)
        tk, tv = self.tail.read(layer, staged)  # (1, Hkv, tail+staged, D)
        if self.quantize_staged and tk.shape[2]:
            tk, tv = roundtrip(tk, self.qk, layer), roundtrip(tv, self.qv, layer)
        k[:, :, pos:s], v[:, :, pos:s] = tk, tv
        return k[:, :, :s], v[:, :, :s]

    def advance(self, n: int) -> None:
        self.tail.advance(n)
        self._migrate()

    def attend_inputs(self, layer: int, staged: int) -> tuple:
        """What decode attention reads of `layer` without dequantizing the history
        (`AttentionBackend.quantized_decode_rows`): exact K, exact V (Hkv, ne, D) (the sinks and
        the tail, read in place when there are no sinks) and the key and value `QTensor` views."""
        ks, vs = self.front(layer)  # (1, Hkv, ns, D)
        kt, vt = self.tail.read(layer, staged)  # (1, Hkv, nt, D)
        ek, ev = (kt[0], vt[0]) if ks.shape[2] == 0 else (torch.cat([ks[0], kt[0]], 1), torch.cat([vs[0], vt[0]], 1))
        return ek, ev, self.qk.view(layer), self.qv.view(layer)

    def _migrate(self) -> None:
        """Fill the sinks from the tail's head, then move whole groups from the tail to the quantized part."""
        t = self.tail
        if self.sinks.length < self.n_sink and self.num_quantized == 0:
            take = min(self.n_sink - self.sinks.length, t.length)
            if take:
                self._move_tail_to(self.sinks, take)
        g = self.token_group
        excess = t.length - self.residual
        if excess >= g:
            n = excess // g * g
            k, v = t.first(n)  # (L, 1, Hkv, n, D)
            self.qk.append_all(k)
            self.qv.append_all(v)
            t.drop_range(0, n)
            self._after_quantize()

    def _after_quantize(self) -> None:
        """Hook for the tiered store (moves old quantized groups to the cold tier)."""

    def _move_tail_to(self, dest: ExactStore, n: int) -> None:
        dest.extend(*self.tail.first(n))  # (L, 1, Hkv, n, D)
        self.tail.drop_range(0, n)

    # -- eviction -----------------------------------------------------------------------
    def drop_range(self, start: int, end: int) -> None:
        """Forget tokens [start, end): whole quantized groups right after the front are
        dropped in place; anything else rebuilds the store from its dequantized tokens."""
        n = end - start
        if start == self.num_front and n % self.token_group == 0 and n <= self.num_quantized:
            self.qk.drop_front(n)
            self.qv.drop_front(n)
            return
        k, v = self._materialize()
        keep = torch.cat([torch.arange(start), torch.arange(end, self.length)]).to(self.device)
        self._rebuild(k.index_select(3, keep), v.index_select(3, keep))

    def gather(self, index: torch.Tensor) -> None:
        """Keep the tokens at `index` (L, 1, Hkv, K) per layer and head (rebuilds the store)."""
        k, v = self._materialize()
        idx = index[..., None].expand(*index.shape, self.head_dim)  # (L, 1, Hkv, K, D)
        self._rebuild(torch.gather(k, 3, idx), torch.gather(v, 3, idx))

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_layers, 1, self.num_kv_heads, self.length, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)  # (L, 1, Hkv, S, D)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        for layer in range(self.num_layers):
            lk, lv = self.read(layer, 0)
            k[layer], v[layer] = lk, lv
        return k, v

    def _rebuild(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Refill from float K, V (L, 1, Hkv, S, D), as if those tokens had just arrived."""
        self.clear()
        self.tail.extend(k, v)
        self._migrate()

    def truncate(self, n: int) -> None:
        if n >= self.length:
            return
        k, v = self._materialize()
        self._rebuild(k[:, :, :, :n], v[:, :, :, :n])

    def clear(self) -> None:
        self.sinks.clear()
        self.tail.clear()
        self.qk.clear()
        self.qv.clear()

    # -- memory -------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held in memory: exact sinks and tail plus packed codes and their scales."""
        return self.sinks.nbytes + self.tail.nbytes + self.qk.nbytes + self.qv.nbytes

    @property
    def nbytes_allocated(self) -> int:
        scratch = 2 * self.scratch_k.numel() * self.scratch_k.element_size()
        return (self.sinks.nbytes_allocated + self.tail.nbytes_allocated + self.qk.nbytes_allocated
                + self.qv.nbytes_allocated + scratch)


class TieredStore(QuantizedKVStore):
    """Hot exact tail, warm quantized middle (at most `warm` + one group), cold oldest tokens
    on disk (a memory-mapped file, read back when attention needs them) or dropped."""

    kind = "tiered"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, hot: int, warm_bits: int,
                 warm: int, cold: str, group_size: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 256, exact_dtype: torch.dtype | None = None, clip: bool = False,
                 value_group_size: int = 0, rotate_values: bool = False, key_bits: tuple[int, ...] = (),
                 value_bits: tuple[int, ...] = ()):
        super().__init__(num_layers, num_kv_heads, head_dim, warm_bits, group_size, hot, 0, dtype, device, capacity,
                         exact_dtype, clip, value_group_size, rotate_values, key_bits=key_bits, value_bits=value_bits)
        self.warm, self.cold = warm, cold
        self.cold_length = 0
        self.dropped = 0
        self._file = None
        self._cold_k = self._cold_v = None  # np.memmap (L, Hkv, cap, D) each

    @property
    def num_front(self) -> int:
        return self.cold_length

    def front(self, layer):
        """The cold tier's K, V (1, Hkv, n, D), fetched back from the memory-mapped file."""
        n = self.cold_length
        if not n:
            return (torch.empty(1, self.num_kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device),) * 2
        k = torch.from_numpy(np.asarray(self._cold_k[layer, :, :n])).to(self.device, self.dtype)
        v = torch.from_numpy(np.asarray(self._cold_v[layer, :, :n])).to(self.device, self.dtype)
        return k[None], v[None]

    def _after_quantize(self) -> None:
        g = self.group_size
        excess = self.num_quantized - self.warm
        if excess < g:
            return
        n = excess // g * g
        if self.cold == "disk":
            k = torch.empty(self.num_layers, 1, self.num_kv_heads, n, self.head_dim, dtype=torch.float32)
            v = torch.empty_like(k)
            for layer in range(self.num_layers):
                dequantize(_first_tokens(self.qk.view(layer), n), k[layer])
                dequantize(_first_tokens(self.qv.view(layer), n), v[layer])
            self._append_cold(k[:, 0].numpy(), v[:, 0].numpy())
        else:
            self.dropped += n
        self.qk.drop_front(n)
        self.qv.drop_front(n)

    def _append_cold(self, k: np.ndarray, v: np.ndarray) -> None:
        """Write (L, Hkv, n, D) float tokens after the cold tier, in fp16 on disk."""
        n = k.shape[2]
        need = self.cold_length + n
        if self._cold_k is None or self._cold_k.shape[2] < need:
            cap = max(need, 2 * (self._cold_k.shape[2] if self._cold_k is not None else 0), 256)
            shape = (self.num_layers, self.num_kv_heads, cap, self.head_dim)
            old = (self._cold_k, self._cold_v)
            self._file = tempfile.TemporaryFile(prefix="kvcache-cold-")
            self._file.truncate(2 * int(np.prod(shape)) * 2)
            half = int(np.prod(shape)) * 2
            self._cold_k = np.memmap(self._file, dtype=np.float16, mode="r+", shape=shape, offset=0)
            self._cold_v = np.memmap(self._file, dtype=np.float16, mode="r+", shape=shape, offset=half)
            if old[0] is not None:
                self._cold_k[:, :, : self.cold_length] = old[0][:, :, : self.cold_length]
                self._cold_v[:, :, : self.cold_length] = old[1][:, :, : self.cold_length]
        self._cold_k[:, :, self.cold_length : need] = k
        self._cold_v[:, :, self.cold_length : need] = v
        self.cold_length = need

    def drop_range(self, start, end):
        raise AssertionError("a tiered store decides its own tiers; selectors are refused by the grammar")

    gather = drop_range

    def truncate(self, n: int) -> None:
        if n >= self.length:
            return
        if self.cold_length or self.dropped:
            raise KVCacheError("A tiered cache that has moved tokens to its cold tier cannot be cut back.")
        super().truncate(n)

    def clear(self) -> None:
        super().clear()
        self.cold_length = 0
        self.dropped = 0

    @property
    def disk_nbytes(self) -> int:
        """Bytes of the cold tier on disk (fp16 K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.cold_length * self.head_dim * 2


def _first_tokens(q: QTensor, n: int) -> QTensor:
    """The first n tokens of a quantized tensor (whole groups along "channel"), as views."""
    m = n // q.group_size if q.axis == "channel" else n
    return QTensor(q.data[:, :, :n], q.scale[:, :, :m], q.zero[:, :, :m], (q.shape[0], q.shape[1], n, q.shape[3]),
                   q.bits, q.group_size, q.axis, q.rotation)


def roundtrip(x: torch.Tensor, store, layer: int) -> torch.Tensor:
    """x (1, Hkv, T, D) as `store` gives back `layer`'s tokens once stored (quantized, then dequantized)."""
    q = store.view(layer)  # the layer's width, groups and rotation
    q = quantize(x, q.bits, q.group_size, q.axis, store.clip, q.rotation)
    return dequantize(q, dtype=x.dtype)


def _code_bits(part) -> int:
    """The width a `quantized` or `tiered` part packs its tokens at, as its class declares (`code_bits`)."""
    from kvcache.cache.policies.registry import POLICIES

    return POLICIES[part.name].code_bits(part.params)


def layer_bits(part, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Key and value widths per layer of a `quantized` or `tiered` part: `hi_bits` in the layers
    its `hi_keys` / `hi_values` name, elsewhere its `bits` (`warm_bits`), or `key_bits` for keys."""
    p = part.params
    bits = _code_bits(part)
    widths = []
    for key, base in (("hi_keys", p.get("key_bits") or bits), ("hi_values", bits)):
        hi = p[key].layers
        if hi and hi[-1] >= num_layers:
            raise KVCacheError(f"Policy '{part.name}': {key} names layer {hi[-1]}, but the model's layers are "
                               f"0 to {num_layers - 1}.")
        widths.append(tuple(p["hi_bits"] if i in hi else base for i in range(num_layers)))
    return widths[0], widths[1]


def packed_rate(part, config, per_channel: bool) -> tuple[int, int]:
    """(bytes a token takes packed, all layers' K and V with scales and zero points, rounded up;
    tokens that quantize together) of a `quantized` or `tiered` part: keys grouped per channel
    over `group_size` tokens, or per token like the values."""
    c, p = config, part.params
    tokens = p["group_size"] if per_channel else 1
    key_bits, value_bits = layer_bits(part, c.num_layers)
    vg = p["value_group_size"] or value_group(p["group_size"], c.head_dim)
    kg = p["group_size"] if per_channel else value_group(p["group_size"], c.head_dim)
    packed = (kv_layers_bytes(key_bits, kg, tokens, c.num_kv_heads, c.head_dim, "channel" if per_channel else "token")
              + kv_layers_bytes(value_bits, vg, tokens, c.num_kv_heads, c.head_dim))
    return -(-packed // tokens), tokens


def quantizer_args(part, config) -> tuple[int, dict, QuantizerModes]:
    """What a `quantized` or `tiered` part's store is built with: its code bits, the keyword
    arguments both stores take (clipping, value groups and rotation, per-layer bits), its modes."""
    p = part.params
    bits = _code_bits(part)
    modes = quantizer_modes(p, bits)
    key_bits, value_bits = layer_bits(part, config.num_layers)
    return bits, dict(clip=modes.clip, value_group_size=p["value_group_size"], rotate_values=modes.rotate_values,
                      key_bits=key_bits, value_bits=value_bits), modes
