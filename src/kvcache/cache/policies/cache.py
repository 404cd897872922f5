"""`SequenceCache`: a KV cache whose kept tokens are chosen by selectors and held by a store.

It has the dense `KVCache`'s interface (reserve / write / advance / truncate / clear), so
`LlamaModel.forward` drives it unchanged, plus:
- `seen` (tokens ever appended) next to `length` (tokens kept), and `next_position`, the
  RoPE position of the next token: `seen`, or `length` when a sinks selector asks for
  positions inside the cache (then keys are stored unrotated and rotated on read, so the
  positions never pass the model's `max_position_embeddings`);
- `observes(t)` / `observe(layer, q, k)`, through which eviction scorers see queries;
- `layer_lengths`, the tokens each layer keeps: a scorer may keep a different number in each
  layer (`Scorer.layer_targets`); `length` is then the most a layer keeps, and each layer
  attends over its own (`attend_written` builds a layer's causal mask from its keys).
One sequence per cache (batch 1).
"""

from __future__ import annotations

import torch

from kvcache.cache.attention import AttentionBackend, model_attention
from kvcache.cache.base import StepKVDefaults
from kvcache.cache.policies.grammar import PolicySpec, parse_policy
from kvcache.cache.policies.registry import make_selector, make_store
from kvcache.cache.policies.selectors import EVICT_UNIT, KeepPlan
from kvcache.errors import KVCacheError
from kvcache.models.rope import apply_rotary


class SequenceCache(StepKVDefaults):
    """One sequence's KV cache under a policy (see module docstring)."""

    batch = 1

    def __init__(self, model, policy: str | PolicySpec, capacity: int = 256,
                 attention: AttentionBackend | None = None):
        """`attention`: the backend decode from quantized codes runs on (default: the model's)."""
        self.spec = policy if isinstance(policy, PolicySpec) else parse_policy(policy)
        c = model.config
        self.num_layers, self.num_kv_heads, self.head_dim = c.num_layers, c.num_kv_heads, c.head_dim
        self.dtype, self.device = model.dtype, model.device
        self.rope = model.rope
        self.attention = attention or model_attention(model)
        self.store = make_store(self.spec, c, self.dtype, self.device, capacity)
        self.selectors = [make_selector(p, c.num_layers) for p in self.spec.selectors]
        self.rotates_keys = any(s.cache_positions for s in self.selectors)
        # RoPE position of slot 0 when the cache rotates keys: 0 for our model, whose queries sit at
        # cache positions; `kvcache.hf` moves it so that query-key distances stay those in the cache.
        self.key_position_offset = 0
        self.unit = getattr(self.store, "evict_unit", EVICT_UNIT)
        self.fused_attention = True  # quantized decode attends from the codes (False: dequantize, then SDPA)
        self.clear()

    # -- the KVCache interface the model drives --------------------------------------
    @property
    def length(self) -> int:
        """Tokens kept (the keys attention sees)."""
        return self.store.length

    @property
    def layer_lengths(self) -> list[int]:
        """Tokens kept in each layer."""
        return self.store.layer_lengths

    @property
    def next_position(self) -> int:
        """RoPE position of the next token."""
        return self.length if self.rotates_keys else self.seen

    def reserve(self, n_slots: int) -> None:
        self.store.reserve(n_slots)

    def observes(self, t: int) -> bool:
        return any(s.observes(t) for s in self.selectors)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Append k, v (B, Hkv, T, D); return K, V (B, Hkv, S, D) for attention, or
        (None, None) when this cache attends itself this step (call `attend`)."""
        t = k.shape[2]
        self.store.append(layer, k, v)
        if layer == 0:  # decided once per step: the store's tiers only change at `advance`
            self._fused_step = t == 1 and self._fused
        if self._fused_step:  # decode over quantized history: see QuantizedKVStore.attend
            self._written = None
            return None, None
        keys, values = self.store.read(layer, t)  # (B, Hkv, S, D)
        if keys.dtype != self.dtype:  # exact tokens kept in another dtype (e.g. full:dtype=fp16)
            keys, values = keys.to(self.dtype), values.to(self.dtype)
        if self.rotates_keys:  # stored unrotated: rotate to slots 0..S-1
            s = keys.shape[2]
            cos, sin = self.rope.slice(self.key_position_offset, s)  # (1, S, 1, D)
            keys = apply_rotary(keys, cos[0, :, 0], sin[0, :, 0])  # at positions offset..offset+S-1
        return self.kept_for_attention(keys, values)

    @property
    def _fused(self) -> bool:
        return (self.fused_attention and getattr(self.store, "num_quantized", 0) > 0
                and getattr(self.store, "fused_decode", False)
                and not self.rotates_keys and not self.observes(1))

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q (B, Hq, T, D) over the layer: over the K/V `write` returned (with `mask`),
        or for a single query over quantized history, from the store's codes. Returns (B, T, Hq*D)."""
        if self._written is not None:
            return self.attend_written(q, mask)
        _, hq, _, d = q.shape
        o = self.attention.quantized_decode_rows(q.reshape(1, hq, d), [self.attend_inputs(layer)])  # (1, Hq, D)
        return o.view(1, 1, hq * d)

    def attend_inputs(self, layer: int) -> tuple:
        """When `write` returned (None, None): what attention reads from the store this step
        (`QuantizedKVStore.attend_inputs`), so several caches can attend in one call."""
        return self.store.attend_inputs(layer, 1)

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        for s in self.selectors:
            if s.observes(q.shape[2]):
                s.observe(layer, q, k)

    def advance(self, t: int) -> None:
        """Commit the step's t tokens, then let each selector evict."""
        self.store.advance(t)
        self.seen += t
        for sel in self.selectors:
            held = self.length
            plan = sel.plan(held, self.seen, t, self.unit, lambda layer: self.store.read(layer, 0))
            if plan is not None:
                self._apply(plan, held)

    def _apply(self, plan: KeepPlan, held: int) -> None:
        before = sum(self.store.layer_lengths)
        if plan.index is None:
            self.store.drop_range(plan.drop_start, plan.drop_end)
        else:
            self.store.gather(plan.index)
        self.evicted += -(-(before - sum(self.store.layer_lengths)) // self.num_layers)  # a layer's mean, rounded up
        for sel in self.selectors:
            sel.kept(plan, held)

    def truncate(self, n_slots: int) -> None:
        """Forget tokens from `n_slots` on; only possible while nothing was evicted."""
        if n_slots == self.seen:
            return
        if self.evicted:
            raise KVCacheError("This cache has evicted tokens, so it cannot be cut back to an earlier point.")
        self.store.truncate(n_slots)
        self.seen = self.length

    def clear(self) -> None:
        self.store.clear()
        self.seen = 0
        self.evicted = 0
        for sel in self.selectors:
            if hasattr(sel, "scores"):
                sel.scores = [None] * self.num_layers

    # -- memory -------------------------------------------------------------------------
    @property
    def tokens_held(self) -> int:
        return self.length

    @property
    def nbytes_used(self) -> int:
        """Bytes the store really holds for the kept tokens (metadata included)."""
        return self.store.nbytes

    @property
    def nbytes_allocated(self) -> int:
        return self.store.nbytes_allocated

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token of the model dtype (what a dense cache would spend)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def stats(self) -> dict:
        kept = round(sum(self.layer_lengths) / self.num_layers)  # a layer's mean (layers may keep different numbers)
        return {"policy": self.spec.text, "seen": self.seen, "kept": kept, "evicted": self.evicted,
                "kv_bytes": self.nbytes_used, "disk_bytes": getattr(self.store, "disk_nbytes", 0)}
