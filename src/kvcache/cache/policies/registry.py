"""Every policy by name: one class a file, registered by its import line here (see `base.Policy`)."""

from __future__ import annotations

from kvcache.cache.policies.base import Policy
from kvcache.cache.policies.window import Window  # noqa: F401  (each import registers a policy)
from kvcache.cache.policies.sinks import Sinks  # noqa: F401
from kvcache.cache.policies.evict import Evict  # noqa: F401
from kvcache.cache.policies.full import Full  # noqa: F401
from kvcache.cache.policies.quantized import Quantized  # noqa: F401
from kvcache.cache.policies.tiered import Tiered  # noqa: F401


def _declared(cls: type[Policy]) -> list[type[Policy]]:
    """`cls` and its subclasses, depth first (Sinks is a Window), those with a name."""
    found = [cls] if cls.name else []
    for sub in cls.__subclasses__():
        found += _declared(sub)
    return found


POLICIES: dict[str, type[Policy]] = {c.name: c for c in _declared(Policy)}  # in import order
SELECTORS = tuple(n for n, c in POLICIES.items() if c.role == "selector")  # which tokens to keep
STORES = tuple(n for n, c in POLICIES.items() if c.role == "store")  # how the kept tokens are held


def make_selector(part, num_layers: int):
    """The selector a selector part names, set up with its keys."""
    return POLICIES[part.name].from_params(part.params, num_layers)


def make_store(spec, config, dtype, device, capacity: int):
    """The per-sequence store a policy's store part names."""
    return POLICIES[spec.store.name].make_store(spec.store, config, dtype, device, capacity)
