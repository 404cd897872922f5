"""Eviction scorers by name: one class a file, registered by its import line here (see `base.Scorer`)."""

from __future__ import annotations

from kvcache.cache.policies.scorers.base import Scorer, attention_mass
from kvcache.cache.policies.scorers.h2o import H2O  # noqa: F401  (each import registers a scorer)
from kvcache.cache.policies.scorers.snapkv import SnapKV  # noqa: F401
from kvcache.cache.policies.scorers.knorm import Knorm  # noqa: F401
from kvcache.cache.policies.scorers.tova import TOVA  # noqa: F401
from kvcache.cache.policies.scorers.pyramidkv import PyramidKV  # noqa: F401



def _declared(cls: type[Scorer]) -> list[type[Scorer]]:
    """The scorers below `cls`, depth first (a scorer may refine another), those with a name."""
    found = []
    for sub in cls.__subclasses__():
        found += ([sub] if sub.name else []) + _declared(sub)
    return found


SCORERS: dict[str, type[Scorer]] = {s.name: s for s in _declared(Scorer)}  # in import order, refinements after theirs

__all__ = ["SCORERS", "Scorer", "attention_mass", "make_scorer"]


def make_scorer(params: dict) -> Scorer:
    """The scorer an `evict` part names (`params["scorer"]`), set up with the part's keys."""
    return SCORERS[params["scorer"]](params)
