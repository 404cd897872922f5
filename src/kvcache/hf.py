"""kvcache's KV policies as `transformers` Cache objects: a drop-in for `model.generate`.

    import kvcache.hf
    cache = kvcache.hf.SinkCache(n_sink=4, window=1020, config=model.config)
    out = model.generate(**inputs, cache=cache, max_new_tokens=64)   # or past_key_values=cache
    print(cache.stats())   # seen, kept, evicted, kv_bytes

`PolicyCache(policy, config=...)` takes any policy string of `kvcache.cache.policies.grammar`
(`window:size=N`, `sinks:n_sink=4,window=N`, `evict:scorer=knorm,ratio=R`,
`quantized:bits=4`, compositions with `+`); `WindowCache`, `SinkCache`, `KnormCache` and
`QuantizedCache` spell the common ones as keyword arguments. Batches work (left padding, beam
search): each row has its own `SequenceCache` and keeps what it would keep alone.

How it maps onto transformers 5.x (`transformers.cache_utils.Cache`):
- Each attention layer calls `update(k, v, layer_idx, ...)` with this step's keys, already
  rotated at their absolute positions, and attends to what it returns. We append into our
  `kvcache.cache.policies.cache.SequenceCache` and return the kept tokens plus the new ones. The step is
  committed (and the policy evicts) when the cache is next used - the next step's first
  `update`, or any size query - never between a layer's `update` and its attention, whose K/V
  are views of the storage that eviction rewrites.
- Rows and padding: a row's real tokens in a step are the last ones, up to its position
  (`position_ids`, which transformers counts from the attention mask); the left padding before
  them is never stored, so it neither fills a window nor shifts sink positions. A row whose
  positions show padding elsewhere (after its tokens: right padding, as in transformers' own
  tests) is stored whole from then on, padding included, as DynamicCache stores it, and
  transformers' mask hides the padding; such a row cannot be kept by attention sinks nor evict
  (a KVCacheError says to pad on the left).
- Sizes: `get_seq_length()` is the number of columns fed, padding included (transformers'
  index of the next token), and `get_mask_sizes(q)` is (span + q, seen - span), span the most
  tokens a row keeps. `update` returns each row's kept tokens right-aligned at the span, then
  the step's tokens: every kept token is visible and the new ones are causal among themselves,
  whatever the policy dropped. Zeros fill the left of shorter rows; transformers' padding mask
  hides them while a row has evicted nothing (it then holds exactly its real tokens). Where a
  row has evicted, its zeros sit at real positions of the mask, so the cache hands the
  attention an additive mask for them (`position_bias`, which transformers' SDPA attention
  adds to the scores); other attention implementations get a KVCacheError in that case.
- Beam search and row selection (`reorder_cache`, `batch_select_indices`,
  `batch_repeat_interleave`) reorder the rows, copying a row taken twice.
- Attention sinks (StreamingLLM): keys are un-rotated into the store (RoPE by -p, p their
  position) and, on read, rotated at positions P0 - kept + j (P0 the first query's position),
  so each query-key distance is the distance inside the cache, as our own model does with
  queries at cache positions. Positions come from the `position_ids` the model passes along,
  else seen + i.
- Scorers that need the queries (`needs_queries`: h2o, snapkv, ...) cannot work here: transformers hands the
  cache keys and values only. Those that score the keys alone (`knorm`) can.
"""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcache.cache.attention import TORCH
from kvcache.cache.policies.cache import SequenceCache as _PolicyCore
from kvcache.cache.policies.grammar import PolicySpec, parse_policy
from kvcache.cache.policies.scorers import SCORERS
from kvcache.errors import KVCacheError
from kvcache.models.config import LlamaConfig
from kvcache.models.rope import RotaryTable, apply_rotary

# eviction scorers that need no queries, so work through transformers
KEY_ONLY_SCORERS = tuple(name for name, s in SCORERS.items() if not s.needs_queries)

__all__ = ["PolicyCache", "WindowCache", "SinkCache", "KnormCache", "QuantizedCache", "KEY_ONLY_SCORERS"]


def _llama_config(config) -> LlamaConfig:
    """Our LlamaConfig from a transformers config (or a model that has one)."""
    if config is None:
        raise KVCacheError("A kvcache.hf cache needs the model's config, as in PolicyCache(policy, config=model.config).")
    config = getattr(config, "config", config)  # a model was given
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return LlamaConfig.from_hf(as_dict)


def _check_policy(spec: PolicySpec) -> None:
    for part in spec.selectors:
        scorer = part.params.get("scorer")
        if part.name == "evict" and scorer not in KEY_ONLY_SCORERS:
            raise KVCacheError(
                f"Eviction scorer '{scorer}' needs the attention queries, which transformers does not pass to "
                f"a Cache; through kvcache.hf use {', '.join(KEY_ONLY_SCORERS)} (or window / sinks), "
                "or run it on kvcache's own engine (LLM(kv_policy=...))."
            )


class _PolicyLayer(CacheLayerMixin):
    """One layer's face of a `PolicyCache`, for transformers code that walks `cache.layers`."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: "PolicyCache", layer_idx: int):  # no super().__init__: keys/values are views
        self.owner, self.layer_idx = owner, layer_idx

    @property
    def is_initialized(self) -> bool:
        return bool(self.owner.rows)

    @property
    def keys(self) -> torch.Tensor | None:
        """Kept keys (B, Hkv, S, D) as stored (unrotated under attention sinks)."""
        return self.owner.layer_kv(self.layer_idx)[0]

    @property
    def values(self) -> torch.Tensor | None:
        return self.owner.layer_kv(self.layer_idx)[1]

    @property
    def is_croppable(self) -> bool:
        return self.owner.is_croppable

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.layer_idx, *args, **kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.owner.reset()

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class PolicyCache(Cache):
    """A `transformers` Cache that keeps tokens by a kvcache policy string (see module docstring).

    `config`: the model's config (or the model). `capacity`: tokens of storage allocated at
    first (it doubles when needed; window policies stay within window + 16).
    """

    def __init__(self, policy: str | PolicySpec = "full", *, config=None, capacity: int = 256):
        self.spec = policy if isinstance(policy, PolicySpec) else parse_policy(policy)
        _check_policy(self.spec)
        self.model_config = _llama_config(config)
        self._hf_config = getattr(config, "config", config)  # read for the attention implementation
        self.capacity = capacity
        self.rows: list[_PolicyCore] = []  # one SequenceCache a batch row, built at the first update
        self.columns = 0  # tokens transformers has fed each row, left padding included
        self._new: list[int] = []  # real tokens of each row in the step in flight (the rest is padding)
        self._whole: list[bool] = []  # rows stored with every column: their padding is not on the left
        self._step = 0  # tokens per row of the step in flight (0: none)
        self._span = 0  # kept tokens of the longest row when the step began
        self._bias: torch.Tensor | None = None  # (B, 1, T, span+T) for rows the padding mask cannot hide
        self._layers_written = 0
        super().__init__(layers=[_PolicyLayer(self, i) for i in range(self.model_config.num_layers)])

    # -- transformers' Cache interface ---------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append this step's k, v (B, Hkv, T, D) of layer `layer_idx`; return K, V (B, Hkv, S+T, D) to attend to."""
        b, _, t, _ = key_states.shape
        if layer_idx == 0:
            self._commit()
            self._begin(key_states, _position_ids(args, kwargs))
        elif t != self._step or b != len(self.rows) or layer_idx != self._layers_written:
            raise KVCacheError("kvcache.hf caches expect every layer to be updated in order with the same tokens.")
        if self.rows[0].rotates_keys:
            key_states = apply_rotary(key_states, self._cos, self._neg_sin)  # back to unrotated
        kv = [core.write(layer_idx, key_states[i:i + 1, :, t - n:], value_states[i:i + 1, :, t - n:])
              for i, (core, n) in enumerate(zip(self.rows, self._new))]  # each (1, Hkv, kept_i+n_i, D)
        self._layers_written += 1
        if self._bias is not None:
            _pass_bias(self._bias, kwargs)
        if b == 1 and self._new[0] == t:
            return kv[0]
        return self._right_aligned(kv, t)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far, padding included (the next token's index in transformers' mask)."""
        self._commit()
        return self.columns

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset): the longest row's kept tokens count as the last positions before the queries."""
        self._commit()
        span = self._kept_max()
        return span + query_length, self.columns - span

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reset(self) -> None:
        self._step = self._layers_written = self.columns = 0
        self._whole = [False] * len(self.rows)
        for core in self.rows:
            core.clear()

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can take tokens back: no row has evicted yet (assisted decoding asks after the prompt;
        a policy that evicts later makes the next crop a KVCacheError)."""
        self._commit()
        return not any(core.evicted for core in self.rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens (only while nothing was evicted)."""
        self._commit()
        if tokens_to_remove > 0:
            raise KVCacheError("crop takes a negative number: how many of the last tokens to remove.")
        if tokens_to_remove:
            for core in self.rows:
                core.truncate(core.seen + tokens_to_remove)
            self.columns += tokens_to_remove

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes row beam_idx[i] (beam search)."""
        self._take_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._take_rows([i for i in range(len(self.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take_rows(torch.as_tensor(indices).reshape(-1).tolist())

    @property
    def batch_size(self) -> int:
        return len(self.rows) if self.rows else -1

    # -- what the cache holds --------------------------------------------------------------
    @property
    def seen(self) -> int:
        return self.get_seq_length()

    @property
    def kept(self) -> int:
        """Tokens the cache holds, all rows together (what attention sees besides the new ones)."""
        self._commit()
        return sum(core.length for core in self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes the stores really hold for the kept tokens (quantization metadata included)."""
        self._commit()
        return sum(core.nbytes_used for core in self.rows)

    @property
    def nbytes_allocated(self) -> int:
        self._commit()
        return sum(core.nbytes_allocated for core in self.rows)

    def stats(self) -> dict:
        """policy, seen, kept, evicted, kv_bytes, disk_bytes: summed over the rows, padding not counted."""
        self._commit()
        total = {"policy": self.spec.text, "seen": 0, "kept": 0, "evicted": 0, "kv_bytes": 0, "disk_bytes": 0}
        for row in self.row_stats():
            for key in ("seen", "kept", "evicted", "kv_bytes", "disk_bytes"):
                total[key] += row[key]
        return total

    def row_stats(self) -> list[dict]:
        """`stats()` of each batch row."""
        self._commit()
        return [core.stats() for core in self.rows]

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Kept K, V (B, Hkv, S, D) of a layer, as stored; shorter rows are zeros on the left."""
        self._commit()
        if not self.rows:
            return None, None
        kv = [core.store.read(layer_idx, 0) for core in self.rows]  # each (1, Hkv, kept_i, D)
        return kv[0] if len(kv) == 1 else self._right_aligned(kv, 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(policy={self.spec.text!r}, seen={self.seen}, kept={self.kept})"

    # -- internals ---------------------------------------------------------------------------
    def _build(self, like: torch.Tensor) -> _PolicyCore:
        c = self.model_config
        rope = self.rows[0].rope if self.rows else None  # one table for all rows
        if rope is None and any(p.name == "sinks" for p in self.spec.selectors):
            # computed in float32 and cast, as transformers does, so un-rotation undoes its rotation
            rope = RotaryTable(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings,
                               like.device, like.dtype)
        model = SimpleNamespace(config=c, dtype=like.dtype, device=like.device, rope=rope)
        # transformers attends itself: always hand it K and V (never attend from codes)
        core = _PolicyCore(model, self.spec, capacity=self.capacity, attention=TORCH)
        core.fused_attention = False
        return core

    def _begin(self, key_states: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Start a step: each row's real tokens are the last ones, up to its position (left padding is dropped)."""
        b, t, device = key_states.shape[0], key_states.shape[2], key_states.device
        if not self.rows:
            self.rows.append(self._build(key_states))
            self.rows += [self._build(key_states) for _ in range(b - 1)]
            self._whole = [False] * b
        if b != len(self.rows):
            raise KVCacheError(f"This cache holds {len(self.rows)} sequences, but a step brought a batch of {b}; "
                               "use a new cache (or cache.reset()) for a new batch.")
        if position_ids is None:
            positions = torch.arange(self.columns, self.columns + t, device=device).expand(b, t)  # (B, T)
        else:
            positions = position_ids.to(device).reshape(-1, position_ids.shape[-1])[:, -t:].expand(b, t)  # (B, T)
        self._span = self._kept_max()
        self._step, self._layers_written = t, 0
        self._inference = torch.is_inference_mode_enabled()
        self._new = [self._real_tokens(i, positions[i]) for i in range(b)]
        for core, n in zip(self.rows, self._new):
            core.reserve(core.length + n)
        self._bias = self._filler_bias(t, key_states.dtype, device)
        if self.rows[0].rotates_keys:
            cos, sin = self.rows[0].rope.lookup(positions)  # (B, T, 1, D)
            self._cos, self._neg_sin = cos[:, None, :, 0], -sin[:, None, :, 0]  # (B, 1, T, D)
            for i, (core, n) in enumerate(zip(self.rows, self._new)):
                first = int(positions[i, t - n]) if n else core.seen
                core.key_position_offset = first - core.length  # queries at their positions, keys just before

    def _real_tokens(self, row: int, positions: torch.Tensor) -> int:
        """How many of the step's last tokens are row `row`'s own, from its positions (T,): those up to its
        position, when they count on from what it holds (left padding before them); else every column, and
        the row is stored whole from now on."""
        core, t = self.rows[row], positions.shape[0]
        if not self._whole[row]:
            positions = positions.cpu()
            n = max(0, min(t, int(positions[-1]) + 1 - core.seen))
            fill = positions[:t - n]  # the padding's positions: one value repeated
            left = torch.equal(positions[t - n:], torch.arange(core.seen, core.seen + n)) and bool((fill == fill[:1]).all())
            # all columns at one position: one real token, first or last; a policy keeping every token keeps all
            unsure = t > 1 and core.seen == 0 and bool((positions == positions[0]).all()) and not self.spec.selectors
            if n == t or (left and not unsure):
                return n
            self._whole[row] = True
        if core.rotates_keys or core.evicted:
            raise KVCacheError(f"Row {row} of this batch has padding after its first tokens, which policy "
                               f"'{self.spec.text}' cannot keep apart from its tokens once it "
                               f"{'rotates' if core.rotates_keys else 'evicts'} them; pad on the left "
                               "(tokenizer padding_side='left').")
        return t

    def _right_aligned(self, kv: list[tuple[torch.Tensor, torch.Tensor]], t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows' K, V (1, Hkv, kept_i + n_i, D) into (B, Hkv, span + t, D): kept tokens end at the span,
        the step's real tokens at the end, zeros elsewhere (left padding, shorter rows)."""
        span = self._span if t else self._kept_max()
        like = kv[0][0]
        keys = like.new_zeros(len(kv), like.shape[1], span + t, like.shape[3])
        values = torch.zeros_like(keys)
        for i, ((k, v), n) in enumerate(zip(kv, self._new if t else [0] * len(kv))):
            kept = k.shape[2] - n
            keys[i, :, span - kept:span], values[i, :, span - kept:span] = k[0, :, :kept], v[0, :, :kept]
            if n:
                keys[i, :, span + t - n:], values[i, :, span + t - n:] = k[0, :, kept:], v[0, :, kept:]
        return keys, values

    def _filler_bias(self, t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """An additive mask (B, 1, T, span+T) hiding the zeros before a row's kept tokens, where
        transformers' padding mask cannot: a row that evicted has real tokens at those positions."""
        hidden = [self._span - core.length if core.length < core.seen else 0 for core in self.rows]
        if not any(hidden):
            return None
        if getattr(self._hf_config, "_attn_implementation", None) != "sdpa":
            raise KVCacheError("The rows of this batch evicted different numbers of tokens, which only the 'sdpa' "
                               "attention can be told through kvcache.hf: load the model with "
                               "attn_implementation='sdpa', or generate one prompt at a time.")
        bias = torch.zeros(len(self.rows), 1, t, self._span + t, dtype=dtype, device=device)
        for i, n in enumerate(hidden):
            bias[i, :, :, :n] = torch.finfo(dtype).min
        return bias

    def _take_rows(self, indices: list[int]) -> None:
        """The rows at `indices`, in that order; a row taken twice is copied."""
        self._commit()
        if self._step:
            raise KVCacheError("kvcache.hf caches cannot change their rows in the middle of a step.")
        taken: set[int] = set()
        rows = []
        for i in indices:
            rows.append(self.rows[i] if i not in taken else _copy_row(self.rows[i]))
            taken.add(i)
        self.rows = rows
        self._whole = [self._whole[i] for i in indices]

    def _kept_max(self) -> int:
        return max((core.length for core in self.rows), default=0)

    def _commit(self) -> None:
        """Commit a finished step (every layer written): the policy may evict now."""
        if self._step and self._layers_written == len(self.layers):
            with torch.inference_mode(self._inference):  # the step's tensors may be inference tensors
                for core, n in zip(self.rows, self._new):
                    core.advance(n)
            self.columns += self._step
            self._step = self._layers_written = 0



def _copy_row(core: _PolicyCore) -> _PolicyCore:
    """An independent copy of one row's cache (the rotary table stays shared)."""
    try:
        return copy.deepcopy(core, {id(core.rope): core.rope})
    except (TypeError, ValueError, pickle.PicklingError) as e:
        raise KVCacheError(f"Policy '{core.spec.text}' keeps tokens on disk, so its rows cannot be copied "
                           "(beam search, repeated rows).") from e


def _pass_bias(bias: torch.Tensor, kwargs: dict) -> None:
    """Hand `bias` to the attention function through the keyword arguments the attention layer passes
    on to it (`kwargs=`); transformers' SDPA attention adds it to the scores."""
    bag = kwargs.get("kwargs")
    if not isinstance(bag, dict):
        raise KVCacheError("The rows of this batch evicted different numbers of tokens, and this model's attention "
                           "layer does not let kvcache.hf mask them; generate one prompt at a time.")
    if bag.get("position_bias") is not None and bag["position_bias"] is not bias:
        raise KVCacheError("This model already adds a position bias to its attention scores, so kvcache.hf cannot "
                           "mask rows that evicted different numbers of tokens; generate one prompt at a time.")
    bag["position_bias"] = bias


def _position_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The step's position_ids, which transformers' Llama attention passes on in `kwargs=`."""
    for bag in (kwargs.get("kwargs"), kwargs.get("cache_kwargs"), *(a for a in args if isinstance(a, dict))):
        if isinstance(bag, dict) and bag.get("position_ids") is not None:
            return bag["position_ids"]
    return None


class WindowCache(PolicyCache):
    """Keep the last `size` tokens (`window:size=N`)."""

    def __init__(self, size: int = 1024, *, config=None, capacity: int = 256):
        super().__init__(f"window:size={size}", config=config, capacity=capacity)


class SinkCache(PolicyCache):
    """StreamingLLM: the first `n_sink` tokens plus the last `window` (`sinks:n_sink=4,window=N`)."""

    def __init__(self, n_sink: int = 4, window: int = 1020, *, config=None, capacity: int = 256):
        super().__init__(f"sinks:n_sink={n_sink},window={window}", config=config, capacity=capacity)


class KnormCache(PolicyCache):
    """After the prompt (and while decoding with decode=True), keep the lowest-key-norm tokens.

    Give `ratio` (fraction removed) or `budget` (tokens kept); the last `window` always stay.
    """

    def __init__(self, ratio: float | None = None, *, budget: int | None = None, window: int = 32,
                 decode: bool = False, config=None, capacity: int = 256):
        amount = f"budget={budget}" if budget is not None else f"ratio={ratio if ratio is not None else 0.5}"
        super().__init__(f"evict:scorer=knorm,{amount},window={window},decode={str(decode).lower()}",
                         config=config, capacity=capacity)


class QuantizedCache(PolicyCache):
    """K and V quantized to `bits` (8, 4 or 2) in groups, the last `residual` tokens exact."""

    def __init__(self, bits: int = 4, group_size: int = 64, residual: int = 128, *, config=None,
                 capacity: int = 256):
        super().__init__(f"quantized:bits={bits},group_size={group_size},residual={residual}",
                         config=config, capacity=capacity)
