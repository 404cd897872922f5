"""The KV policy string grammar shared by the API, the CLI and the server.

    policy   := part ("+" part)*
    part     := name [":" key "=" value ("," key "=" value)*]

e.g. ``quantized:bits=4,group_size=64,residual=128`` or
``sinks:n_sink=4,window=2044+quantized:bits=8``. Each name has a fixed set of typed keys
with defaults; anything else is an error that lists what is valid. The names and keys come from
the policy classes (`registry.POLICIES`); the grammar knows nothing of how a policy runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcache.cache.policies.params import Param, QuantizerModes, quantizer_modes  # noqa: F401  (shared names)
from kvcache.cache.policies.registry import POLICIES, SELECTORS, STORES
from kvcache.errors import KVCacheError

# name -> key -> Param, as each policy class declares them (policies/<name>.py)
POLICY_PARAMS: dict[str, dict[str, Param]] = {name: cls.params for name, cls in POLICIES.items()}


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
        return POLICIES[self.store.name].keeps_exactly(self.store.params)

    @property
    def canonical(self) -> str:
        """The policy with every key spelled out, in a fixed order ('' for keep-everything)."""
        parts = [*self.selectors] + ([] if self._plain_store else [self.store])
        return "+".join(str(p) for p in parts)


def _parse_part(text: str) -> PolicyPart:
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in POLICY_PARAMS:
        raise KVCacheError(f"Unknown KV policy '{name}'; valid policies are {', '.join(POLICY_PARAMS)}.")
    cls = POLICIES[name]
    schema = cls.params
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
    params = cls.fill(given)
    cls.check(params)
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
    if selectors and not POLICIES[store.name].combines_with_selectors:
        raise KVCacheError(f"Policy '{store.name}' already decides which tokens to keep; do not combine it with a selector.")
    ragged = [p for p in selectors if POLICIES[p.name].ragged_layers(p.params)]
    if ragged and (len(selectors) > 1 or not POLICIES[store.name].holds_ragged_layers):
        takers = ", ".join(n for n in STORES if POLICIES[n].holds_ragged_layers)
        raise KVCacheError(f"Policy '{ragged[0]}' keeps a different number of tokens in each layer, so it takes "
                           f"no other selector and only a store that holds a length per layer ({takers}).")
    return PolicySpec(selectors, store, text)
