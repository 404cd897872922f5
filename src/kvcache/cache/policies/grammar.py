"""The KV policy string grammar shared by the API, the CLI and the server.

    policy   := part ("+" part)*
    part     := name [":" key "=" value ("," key "=" value)*]

e.g. ``quantized:bits=4,group_size=64,residual=128`` or
``sinks:n_sink=4,window=2044+quantized:bits=8``. Each name has a fixed set of typed keys
with defaults; anything else is an error that lists what is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcache.cache.policies.scorers import SCORERS
from kvcache.errors import KVCacheError


@dataclass(frozen=True)
class Param:
    """One key of a policy: its type, default and allowed values."""

    type: type
    default: object
    choices: tuple = ()
    minimum: float | None = None
    hint: str = ""  # what a valid value looks like, added to the error

    def convert(self, policy: str, key: str, text: str) -> object:
        try:
            if self.type is bool:
                low = text.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = low in ("true", "1", "yes")
            else:
                value = self.type(text)
        except ValueError:
            raise KVCacheError(
                f"Policy '{policy}': {key}={text!r} is not a valid "
                f"{getattr(self.type, 'label', self.type.__name__)}{self.hint}."
            ) from None
        if self.choices and value not in self.choices:
            raise KVCacheError(
                f"Policy '{policy}': {key} must be one of {', '.join(map(str, self.choices))}, got {text!r}."
            )
        if self.minimum is not None and value < self.minimum:
            raise KVCacheError(f"Policy '{policy}': {key} must be at least {self.minimum}, got {text!r}.")
        return value


EXACT_DTYPES = ("model", "fp32", "fp16", "bf16")  # "model": the model's own dtype
# quantizer ranges: "mse" = per group the least-error clipped range (cache/quant.py), "none" = min-max,
# "auto" = mse at 2 bits (where it halves the perplexity cost), none at 8 and 4
CLIP_MODES = ("auto", "none", "mse")
# "values": quantize each value vector times a Hadamard matrix (spreads outlier channels; head_dim a power
# of two); "keys" / "both": key vectors too, for keys grouped per token (key_axis=token; a rotation would
# mix the channels a per-channel group keeps apart); "none"; "auto" = values at 2 bits, and keys when they
# are grouped per token at 4 or 2 bits (RoPE leaves a few huge key channels that stretch a token's range)
ROTATE_MODES = ("auto", "none", "values", "keys", "both")



class LayerList(str):
    """Layer numbers separated by '/' (commas separate keys), e.g. '0/1/29', or 'none'; kept
    canonical: sorted, without repeats."""

    label = "layer list"

    def __new__(cls, text: str = "none"):
        if text.lower() == "none":
            return super().__new__(cls, "none")
        layers = sorted({int(t) for t in text.split("/")})  # int() raises ValueError on junk
        if layers[0] < 0:
            raise ValueError(text)
        return super().__new__(cls, "/".join(map(str, layers)))

    @property
    def layers(self) -> tuple[int, ...]:
        """The layer numbers (() for 'none')."""
        return () if self == "none" else tuple(int(t) for t in self.split("/"))


_LAYERS_HINT = " (layer numbers separated by '/', e.g. 0/1/29, or none)"
# mixed precision by layer: the keys (values) of these layers are held at hi_bits instead of bits
HI_PARAMS = {
    "hi_keys": Param(LayerList, LayerList(), hint=_LAYERS_HINT),
    "hi_values": Param(LayerList, LayerList(), hint=_LAYERS_HINT),
    "hi_bits": Param(int, 4, choices=(8, 4)),
}

# name -> key -> Param. The policies themselves live in selectors.py and stores.py.
POLICY_PARAMS: dict[str, dict[str, Param]] = {
    "full": {"dtype": Param(str, "model", choices=EXACT_DTYPES)},  # e.g. full:dtype=fp16 under an fp32 model
    "window": {"size": Param(int, 1024, minimum=1)},
    "sinks": {"n_sink": Param(int, 4, minimum=0), "window": Param(int, 1020, minimum=1)},
    "evict": {
        "scorer": Param(str, "snapkv", choices=tuple(SCORERS)),  # scorers/: one class a file
        "ratio": Param(float, 0.0, minimum=0.0),
        "budget": Param(int, 0, minimum=0),
        "window": Param(int, 32, minimum=1),  # recent tokens always kept (and SnapKV's observation window)
        # SnapKV's smoothing: a key scores the mean attention of the `pool` keys around it (odd). 31 keeps
        # a whole planted fact when its first tokens are found; 7 (the paper's) lost its later digits here
        "pool": Param(int, 31, minimum=1),
        "decode": Param(bool, False),  # keep evicting during generation, not only after prefill
    },
    "quantized": {
        "bits": Param(int, 8, choices=(8, 4, 2)),
        "group_size": Param(int, 64, minimum=1),
        "residual": Param(int, 128, minimum=0),  # last tokens kept exact
        "n_sink": Param(int, 0, minimum=0),  # first tokens kept exact
        "exact": Param(str, "model", choices=EXACT_DTYPES),  # dtype of the exact tokens
        "clip": Param(str, "auto", choices=CLIP_MODES),
        "rotate": Param(str, "auto", choices=ROTATE_MODES),
        "value_group_size": Param(int, 0, minimum=0),  # channels per value group; 0: group_size if it divides head_dim
        # "channel": KIVI keys, groups of group_size tokens per channel; "token": keys grouped like values
        # (group_size channels of one token, llama.cpp's q8_0/q4_0 layout); with residual=0 and n_sink=0
        # every token is quantized as it is written, and the paged engine runs the policy
        "key_axis": Param(str, "channel", choices=("channel", "token")),
        "key_bits": Param(int, 0, choices=(0, 8, 4, 2)),  # the keys' own width (e.g. 8 over 4-bit values); 0: bits
        **HI_PARAMS,
    },
    "tiered": {
        "hot": Param(int, 256, minimum=1),  # recent tokens, exact
        "warm_bits": Param(int, 4, choices=(8, 4, 2)),
        "warm": Param(int, 4096, minimum=0),  # older tokens kept quantized in memory
        "cold": Param(str, "disk", choices=("disk", "drop")),  # the oldest: memory-mapped file, or dropped
        "group_size": Param(int, 64, minimum=1),
        "exact": Param(str, "model", choices=EXACT_DTYPES),
        "clip": Param(str, "auto", choices=CLIP_MODES),
        "rotate": Param(str, "auto", choices=ROTATE_MODES),
        "value_group_size": Param(int, 0, minimum=0),  # channels per value group; 0: group_size if it divides head_dim
        **HI_PARAMS,
    },
}
SELECTORS = ("window", "sinks", "evict")  # which tokens to keep
STORES = ("full", "quantized", "tiered")  # how the kept tokens are held


@dataclass(frozen=True)
class QuantizerModes:
    """A quantized or tiered part's "auto" modes resolved for its bit width."""

    clip: bool  # least-error clipped ranges
    rotate_values: bool  # values quantized in a Hadamard basis
    rotate_keys: bool  # keys too (keys grouped per token only)


def quantizer_modes(params: dict, bits: int) -> QuantizerModes:
    """The clip and rotation modes of a quantized or tiered part at `bits` (its values' width; keys
    may have their own, `key_bits`), see ROTATE_MODES."""
    rotate, per_token_keys = params["rotate"], params.get("key_axis", "channel") == "token"
    key_bits = params.get("key_bits") or bits
    return QuantizerModes(
        clip=params["clip"] == "mse" or (params["clip"] == "auto" and min(bits, key_bits) == 2),  # auto: 2-bit only
        rotate_values=rotate in ("values", "both") or (rotate == "auto" and bits == 2),
        rotate_keys=rotate in ("keys", "both") or (rotate == "auto" and key_bits <= 4 and per_token_keys))


@dataclass(frozen=True)
class PolicyPart:
    """One named policy with its keys filled in (defaults included)."""

    name: str
    params: dict = field(default_factory=dict)

    def __str__(self) -> str:
        given = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}:{given}" if given else self.name


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy string: token selectors (applied in order) and at most one store."""

    selectors: tuple[PolicyPart, ...]
    store: PolicyPart
    text: str

    @property
    def is_full(self) -> bool:
        """True when the policy keeps every token exactly (the dense cache)."""
        return not self.selectors and self._plain_store

    @property
    def _plain_store(self) -> bool:
        return self.store.name == "full" and self.store.params.get("dtype", "model") == "model"

    @property
    def canonical(self) -> str:
        """The policy with every key spelled out, in a fixed order ('' for keep-everything)."""
        parts = [*self.selectors] + ([] if self._plain_store else [self.store])
        return "+".join(str(p) for p in parts)

    @property
    def paged_quantized(self) -> PolicyPart | None:
        """The store part when it is a quantized format the paged blocks can hold: keys and values
        grouped per token, every token quantized as it is written (`key_axis=token`, residual 0,
        no exact sinks); None otherwise."""
        p = self.store.params
        if (self.store.name == "quantized" and p["key_axis"] == "token" and p["residual"] == 0 and p["n_sink"] == 0
                and p["hi_keys"] == "none" and p["hi_values"] == "none"):  # one code width for every layer
            return self.store
        return None

    @property
    def _paged_store(self) -> bool:
        return self._plain_store or self.paged_quantized is not None

    @property
    def paged_window(self) -> int | None:
        """The window size when the policy is a `window` over a store the paged engine holds
        (it runs the window by freeing whole blocks); None for every other policy."""
        if self._paged_store and len(self.selectors) == 1 and self.selectors[0].name == "window":
            return self.selectors[0].params["size"]
        return None

    @property
    def paged_sinks(self) -> tuple[int, int] | None:
        """(n_sink, window) when the policy is `sinks` over a store the paged engine holds (it
        keeps the sink blocks and frees window blocks); None for every other policy."""
        if self._paged_store and len(self.selectors) == 1 and self.selectors[0].name == "sinks":
            p = self.selectors[0].params
            return p["n_sink"], p["window"]
        return None

    @property
    def paged_evict(self) -> PolicyPart | None:
        """The `evict` part when the policy is eviction after the prompt only (decode=false) over
        paged blocks, float or quantized (the engine compresses each prompt once); None otherwise."""
        if (self._paged_store and len(self.selectors) == 1 and self.selectors[0].name == "evict"
                and not self.selectors[0].params["decode"]):
            return self.selectors[0]
        return None

    @property
    def runs_paged(self) -> bool:
        """Whether the continuous-batching engine over paged blocks runs this policy: `full`,
        `window`, `sinks`, a paged quantized format, `window` / `sinks` + that format, or
        `evict` after the prompt (decode=false) over either."""
        return ((not self.selectors and self._paged_store) or self.paged_window is not None
                or self.paged_sinks is not None or self.paged_evict is not None)


def _parse_part(text: str) -> PolicyPart:
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in POLICY_PARAMS:
        raise KVCacheError(f"Unknown KV policy '{name}'; valid policies are {', '.join(POLICY_PARAMS)}.")
    schema = POLICY_PARAMS[name]
    given: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if key not in schema:
            valid = ", ".join(schema) or "none"
            raise KVCacheError(f"Policy '{name}' has no key '{key}'; valid keys are {valid}.")
        if not eq or not value.strip():
            raise KVCacheError(f"Policy '{name}': key '{key}' needs a value, as in {key}=...")
        if key in given:
            raise KVCacheError(f"Policy '{name}': key '{key}' is given twice.")
        given[key] = schema[key].convert(name, key, value.strip())
    params = {k: given.get(k, p.default) for k, p in schema.items()}
    return PolicyPart(name, params)


def parse_policy(text: str | None) -> PolicySpec:
    """Parse a policy string ('' or None means 'full': keep everything exactly)."""
    text = (text or "").strip() or "full"
    parts = [_parse_part(p) for p in text.split("+")]
    selectors = tuple(p for p in parts if p.name in SELECTORS)
    stores = [p for p in parts if p.name in STORES]
    if len(stores) > 1:
        raise KVCacheError(
            f"A policy can have one storage part ({', '.join(STORES)}), got {', '.join(p.name for p in stores)}."
        )
    store = stores[0] if stores else _parse_part("full")
    for s in selectors:
        if s.name == "evict":
            ratio, budget = s.params["ratio"], s.params["budget"]
            if (ratio > 0) == (budget > 0):
                raise KVCacheError("Policy 'evict' needs exactly one of ratio (0 < ratio < 1) or budget (tokens).")
            if ratio >= 1:
                raise KVCacheError(f"Policy 'evict': ratio is the fraction removed and must be below 1, got {ratio}.")
            if s.params["pool"] % 2 == 0:
                raise KVCacheError(f"Policy 'evict': pool must be odd (keys on both sides), got {s.params['pool']}.")
    if store.params.get("rotate") in ("keys", "both") and store.params.get("key_axis", "channel") != "token":
        raise KVCacheError(f"Policy '{store.name}': rotate={store.params['rotate']} needs keys grouped per token "
                           "(key_axis=token); per-channel key groups must keep their channels apart.")
    if any(store.params.get(k, "none") != "none" for k in ("hi_keys", "hi_values")):
        bits = max(store.params.get("bits", store.params.get("warm_bits")), store.params.get("key_bits", 0))
        if store.params["hi_bits"] <= bits:
            raise KVCacheError(f"Policy '{store.name}': hi_bits ({store.params['hi_bits']}) must be above the "
                               f"other layers' {bits} bits.")
    if store.name == "tiered" and selectors:
        raise KVCacheError("Policy 'tiered' already decides which tokens to keep; do not combine it with a selector.")
    return PolicySpec(selectors, store, text)
