"""Paged KV blocks held quantized (policy `quantized:bits=8|4|2,key_axis=token,residual=0`).

Each slot holds one token's K and V as packed codes plus a fp16 scale and zero point per
group of channels: keys and values both grouped per token, the layout of llama.cpp's
q8_0 / q4_0 cache (with a zero point). A token is quantized when its step writes it, and
attention reads every slot back dequantized, the step's own tokens included, so what a
token sees does not depend on how prompts were chunked or batched: batched and alone give
the same tokens, and prefix-cache blocks mean the same to every sequence that hits them.
`SequenceCache` runs the same policy one sequence at a time with the same numbers
(`QuantizedKVStore.quantize_staged`), which is how `kvcache eval` measures its quality.

Decode steps attend from the codes of each row's blocks through the storage's attention
backend (`AttentionBackend.paged_quantized_decode`; on CPU a native kernel: key scales applied
to q . codes per token, value scales folded into the probabilities, so no float copy of the
history is made); prefill chunks (and the torch backend) gather the rows' blocks and
dequantize them into the model dtype with torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.native import ops as native
from kvcache.cache.attention import AttentionBackend, QuantizedSlots, attention_backend
from kvcache.cache.quant import QTensor, dequantize, hadamard, quantize, rotated
from kvcache.cache.spec import kv_layers_bytes
from kvcache.errors import KVCacheError

_META = torch.float16


@dataclass(frozen=True)
class TokenQuantFormat:
    """Bits and channel groups of per-token quantized K and V (see the module docstring)."""

    bits: int  # the values' width
    key_group: int
    value_group: int
    clip: bool = False
    rotate_values: bool = False
    rotate_keys: bool = False
    key_bits: int = 0  # the keys' width; 0: bits

    @property
    def k_bits(self) -> int:
        return self.key_bits or self.bits

    @classmethod
    def from_policy(cls, spec, head_dim: int) -> "TokenQuantFormat":
        """The format of a policy's paged blocks, where they hold quantized codes (its store's `paged_format`)."""
        from kvcache.cache.paged_plan import paged_plan
        from kvcache.cache.policies.registry import POLICIES

        fmt = POLICIES[spec.store.name].paged_format(spec.store, head_dim) if paged_plan(spec) else None
        if fmt is None:
            raise KVCacheError(f"The KV policy '{spec.text}' is not a paged quantized format.")
        return fmt

    @classmethod
    def from_part(cls, part, head_dim: int) -> "TokenQuantFormat":
        """The format of a `quantized` part that runs on paged blocks (`Quantized.on_paged_blocks`)."""
        from kvcache.cache.policies.params import quantizer_modes
        from kvcache.cache.policies.quantized_store import value_group

        p = part.params
        modes = quantizer_modes(p, p["bits"])
        key_group = value_group(p["group_size"], head_dim)
        return cls(p["bits"], key_group, p["value_group_size"] or key_group, modes.clip, modes.rotate_values,
                   modes.rotate_keys, p["key_bits"])

    def bytes_per_token(self, num_layers: int, kv_heads: int, head_dim: int) -> int:
        """Bytes one token takes in every layer's K and V (codes, scales, zero points), by `cache/spec.py`."""
        return (kv_layers_bytes((self.k_bits,) * num_layers, self.key_group, 1, kv_heads, head_dim)
                + kv_layers_bytes((self.bits,) * num_layers, self.value_group, 1, kv_heads, head_dim))


class _QuantSlots:
    """One of K or V: codes (L, Hkv, slots, D * bits / 8) uint8, scale and zero (L, Hkv, slots, D / g) fp16."""

    def __init__(self, num_layers: int, kv_heads: int, slots: int, head_dim: int, bits: int, group: int,
                 clip: bool, rotation: torch.Tensor | None, device: torch.device):
        if head_dim % group or (head_dim * bits) % 8:
            raise KVCacheError(f"head_dim {head_dim} does not split into groups of {group} at {bits} bits.")
        self.bits, self.group, self.clip, self.rotation, self.head_dim = bits, group, clip, rotation, head_dim
        self.native = native.supports(torch.float32, device)
        lead = (num_layers, kv_heads, slots)
        self.codes = torch.empty(lead + (head_dim * bits // 8,), dtype=torch.uint8, device=device)
        self.scale = torch.empty(lead + (head_dim // group,), dtype=_META, device=device)
        self.zero = torch.empty(lead + (head_dim // group,), dtype=_META, device=device)

    def zero_slots(self, lo: int, hi: int) -> None:
        for t in (self.codes, self.scale, self.zero):
            t[:, :, lo:hi] = 0

    def copy_slots(self, src: int, dst: int, n: int) -> None:
        """Copy the codes, scales and zero points of slots [src, src + n) to [dst, dst + n), all layers."""
        for t in (self.codes, self.scale, self.zero):
            t[:, :, dst : dst + n] = t[:, :, src : src + n]

    def write(self, layer: int, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x (Hkv, N, D) and scatter it to `slots` (N,)."""
        if self.native and not self.clip:  # one pass, straight into the slots (the same bytes)
            native.quantize_to_slots(rotated(x, self.rotation), slots, self.bits, self.group, self.codes[layer],
                                     self.scale[layer], self.zero[layer])
            return
        q = quantize(x[None], self.bits, self.group, "token", self.clip, self.rotation)  # (1, Hkv, N, ..)
        self.codes[layer].index_copy_(1, slots, q.data[0])
        self.scale[layer].index_copy_(1, slots, q.scale[0])
        self.zero[layer].index_copy_(1, slots, q.zero[0])

    def read(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize (Hkv, N, ..) codes/scale/zero to (Hkv, N, D) of `dtype`."""
        h, n = codes.shape[:2]
        q = QTensor(codes[None], scale[None], zero[None], (1, h, n, self.head_dim), self.bits, self.group, "token",
                    self.rotation)
        return dequantize(q, dtype=dtype)[0]  # (Hkv, N, D)

    def read_range(self, layer: int, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        return self.read(self.codes[layer, :, lo:hi], self.scale[layer, :, lo:hi], self.zero[layer, :, lo:hi], dtype)

    def read_blocks(self, layer: int, idx: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
        """(Hkv, len(idx) * block_size, D): the slots of blocks `idx`, in order."""
        h = self.codes.shape[1]

        def pick(t: torch.Tensor) -> torch.Tensor:
            w = t.shape[-1]
            return t[layer].view(h, -1, block_size * w).index_select(1, idx).view(h, -1, w)  # (Hkv, N, w)

        return self.read(pick(self.codes), pick(self.scale), pick(self.zero), dtype)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copies of codes, scale and zero at per-layer, per-head slots (L, Hkv, K)."""
        return tuple(torch.gather(t, 2, slots[..., None].expand(*slots.shape, t.shape[-1]))
                     for t in (self.codes, self.scale, self.zero))

    def put(self, slots: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> None:
        """Write what `gather` copied to the slots `slots` (K,) of every layer and head, as they are."""
        for t, part in zip((self.codes, self.scale, self.zero), parts):
            t.index_copy_(2, slots, part)

    def layer(self, layer: int) -> QuantizedSlots:
        """The slots of `layer` (views) as attention reads them."""
        return QuantizedSlots(self.codes[layer], self.scale[layer], self.zero[layer], self.bits, self.rotation)

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of one token in one layer."""
        return sum(t[0, :, 0].numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


class PagedQuantizedStorage:
    """The paged pool of `storage.PagedKVStorage`, holding per-token quantized K and V."""

    saves_sessions = False  # snapshots hold float K/V; re-quantizing them would not give these codes back
    decode_sinks = False  # no decode from codes with attention sinks: sinks steps gather and dequantize

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, fmt: TokenQuantFormat,
                 attention: AttentionBackend | None = None):
        """`attention`: how a forward pass attends over these codes (the engine passes its
        model's backend); by default the native kernels where they run."""
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype, self.fmt = num_kv_heads, head_dim, dtype, fmt
        self.device = torch.device(device)
        self.attention = attention or attention_backend(dtype, self.device)
        slots = (num_blocks + 1) * block_size
        rotation = hadamard(head_dim)
        if (fmt.rotate_values or fmt.rotate_keys) and rotation is None:
            raise KVCacheError(f"Rotated keys or values need head_dim to be a power of two, got {head_dim}; "
                               "add rotate=none to the policy.")
        args = (num_layers, num_kv_heads, slots, head_dim)
        self.k = _QuantSlots(*args, fmt.k_bits, fmt.key_group, fmt.clip,
                             rotation.to(self.device) if fmt.rotate_keys else None, self.device)
        self.v = _QuantSlots(*args, fmt.bits, fmt.value_group, fmt.clip,
                             rotation.to(self.device) if fmt.rotate_values else None, self.device)
        self.null_block = num_blocks
        self._zeroed: set[int] = set()
        self.zero_blocks([num_blocks])

    def zero_blocks(self, block_ids) -> None:
        """Zero blocks the first time they are used (see `PagedKVStorage.zero_blocks`): a fp16
        scale of leftover memory could be inf or NaN, which masking does not remove."""
        for b in block_ids:
            if b not in self._zeroed:
                self._zeroed.add(b)
                lo, hi = b * self.block_size, (b + 1) * self.block_size
                self.k.zero_slots(lo, hi)
                self.v.zero_slots(lo, hi)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, copy) block pair's codes as they are (copy-on-write, see
        `PagedKVStorage.copy_blocks`)."""
        bs = self.block_size
        for src, dst in pairs:
            self.k.copy_slots(src * bs, dst * bs, bs)
            self.v.copy_slots(src * bs, dst * bs, bs)
            self._zeroed.add(dst)

    def scatter(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v (B, Hkv, T, D) and scatter them to `slots` (B*T,), row-major over (B, T)."""
        b, h, t, d = k.shape
        self.k.write(layer, slots, k.transpose(0, 1).reshape(h, b * t, d))
        self.v.write(layer, slots, v.transpose(0, 1).reshape(h, b * t, d))

    def read_range(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of slots [lo, hi), dequantized: (1, Hkv, hi - lo, D)."""
        return self.k.read_range(layer, lo, hi, self.dtype)[None], self.v.read_range(layer, lo, hi, self.dtype)[None]

    def read_rows(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of each row's blocks, blocks (B, NB), dequantized: (B, Hkv, NB * block_size, D)."""
        b, nb = blocks.shape
        s, idx = nb * self.block_size, blocks.reshape(-1)
        k = self.k.read_blocks(layer, idx, self.block_size, self.dtype)  # (Hkv, B*S, D)
        v = self.v.read_blocks(layer, idx, self.block_size, self.dtype)
        h, d = self.num_kv_heads, self.head_dim
        return k.view(h, b, s, d).transpose(0, 1), v.view(h, b, s, d).transpose(0, 1)  # (B, Hkv, S, D)

    def gather_tokens(self, slots: torch.Tensor) -> tuple[tuple, tuple]:
        """Copies of the codes of K and V at per-layer, per-head slots (L, Hkv, K) (an eviction
        policy's keeps, moved as codes: nothing is quantized twice)."""
        return self.k.gather(slots), self.v.gather(slots)

    def write_tokens(self, slots: torch.Tensor, k: tuple, v: tuple) -> None:
        """Write what `gather_tokens` copied to the slots `slots` (K,) of every layer and head."""
        self.k.put(slots, k)
        self.v.put(slots, v)

    def keys_at(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Keys of `layer` at `slots` (N,), dequantized (in the stored basis): (Hkv, N, D)."""
        k = self.k
        return k.read(k.codes[layer][:, slots], k.scale[layer][:, slots], k.zero[layer][:, slots], self.dtype)

    def decode_attention(self, layer: int, q: torch.Tensor, table: torch.Tensor, lo: torch.Tensor,
                         hi: torch.Tensor) -> torch.Tensor:
        """Attention of one query per row q (B, Hq, D) from the codes of its blocks (table
        (B, NB) int32, tokens lo <= t < hi) by the storage's backend (the native one makes no
        dequantized copy). Returns (B, Hq, D)."""
        return self.attention.paged_quantized_decode(q, self.k.layer(layer), self.v.layer(layer), table, lo, hi,
                                                     self.block_size)

    def chunk_attention(self, layer: int, q: torch.Tensor, table: torch.Tensor, kv_len: int,
                        min_slot: torch.Tensor | None) -> torch.Tensor:
        """`PagedKVStorage.chunk_attention` from the codes (`AttentionBackend.paged_quantized_chunk`)."""
        return self.attention.paged_quantized_chunk(q, self.k.layer(layer), self.v.layer(layer), table, kv_len,
                                                    self.block_size, min_slot)

    def read_blocks(self, block_ids, num_tokens):
        raise KVCacheError("Sessions are saved from a float KV cache; this engine holds its blocks quantized.")

    write_blocks = read_blocks

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in the pool, all layers (equals `TokenQuantFormat.bytes_per_token`)."""
        return self.num_layers * (self.k.bytes_per_slot + self.v.bytes_per_slot)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes: block_size slots of codes, scales and zero points, all layers."""
        return self.block_size * self.bytes_per_token

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (the null block excluded): num_blocks x bytes per block."""
        return self.num_blocks * self.bytes_per_block
