"""`evict:scorer=NAME,ratio=R|budget=N,window=W`: keep the tokens that matter (H2O, SnapKV, ...)."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvcache.cache.policies.base import Policy
from kvcache.cache.policies.params import Param
from kvcache.cache.policies.scorers import SCORERS, Scorer, make_scorer
from kvcache.cache.policies.selectors import KeepPlan, Selector, evict_target, keep_index
from kvcache.errors import KVCacheError


class Evict(Selector, Policy):
    """Keep the tokens that matter: top scores per layer and KV head, plus the last `window`.

    The `scorer` (`scorers/`, one class each) ranks the held tokens: from each step's queries
    (`Scorer.update`) or from the keys alone (`Scorer.key_score`). Runs after each prompt chunk
    (t > 1), and with decode=true also while generating. `ratio` is the fraction removed;
    `budget` the tokens kept: in every layer, or on average over the layers where the scorer
    spreads them unevenly (`Scorer.layer_targets`; each layer then keeps its own number).
    """

    name = "evict"
    role = "selector"
    params: ClassVar[dict[str, Param]] = {
        "scorer": Param(str, "snapkv", choices=tuple(SCORERS)),  # scorers/: one class a file
        "ratio": Param(float, 0.0, minimum=0.0),
        "budget": Param(int, 0, minimum=0),
        "window": Param(int, 32, minimum=1),  # recent tokens always kept (and SnapKV's observation window)
        # SnapKV's smoothing: a key scores the mean attention of the `pool` keys around it (odd). 31 keeps
        # a whole planted fact when its first tokens are found; 7 (the paper's) lost its later digits here
        "pool": Param(int, 31, minimum=1),
        "decode": Param(bool, False),  # keep evicting during generation, not only after prefill
    }
    # every scorer after the prompt (paged blocks), and while decoding (per-request stores)
    examples = (*(f"evict:scorer={name},ratio=0.5,window=8" for name in SCORERS),
                *(f"evict:scorer={name},budget=40,decode=true" for name in SCORERS))

    def __init__(self, scorer: Scorer, ratio: float, budget: int, window: int, decode: bool, num_layers: int):
        self.scorer, self.ratio, self.budget, self.window, self.decode = scorer, ratio, budget, window, decode
        self.scores: list[torch.Tensor | None] = [None] * num_layers  # (B, Hkv, S) float32 per layer

    @classmethod
    def from_params(cls, params: dict, num_layers: int) -> "Evict":
        p = params
        return cls(make_scorer(p), p["ratio"], p["budget"], p["window"], p["decode"], num_layers)

    @classmethod
    def check(cls, params: dict) -> None:
        ratio, budget = params["ratio"], params["budget"]
        if (ratio > 0) == (budget > 0):
            raise KVCacheError("Policy 'evict' needs exactly one of ratio (0 < ratio < 1) or budget (tokens).")
        if ratio >= 1:
            raise KVCacheError(f"Policy 'evict': ratio is the fraction removed and must be below 1, got {ratio}.")
        if params["pool"] % 2 == 0:
            raise KVCacheError(f"Policy 'evict': pool must be odd (keys on both sides), got {params['pool']}.")

    @classmethod
    def on_paged_blocks(cls, params: dict) -> bool:
        # the engine compresses each prompt once (`cache/paged_evict.py`) into blocks that hold as many
        # tokens in every layer; a scorer whose layers keep different numbers needs a per-request store
        return not params["decode"] and not cls.ragged_layers(params)

    @classmethod
    def paged_plan(cls, part) -> dict:
        return {"evict": part}

    @classmethod
    def ragged_layers(cls, params: dict) -> bool:
        return SCORERS[params["scorer"]].ragged_layers

    @classmethod
    def held_cap(cls, params: dict, slack: int, num_layers: int) -> int | None:
        if not (params["budget"] and params["decode"]):
            return None
        targets = make_scorer(params).layer_targets(params["budget"], num_layers)
        return -(-sum(targets) // num_layers) + slack  # each layer holds at most its target + slack

    def target(self, seen: int) -> int:
        return evict_target(self.ratio, self.budget, seen)

    def observes(self, t: int) -> bool:
        return self.scorer.needs_queries and (t > 1 or self.decode)

    def observe(self, layer, q, k):
        self.scores[layer] = self.scorer.update(self.scores[layer], q, k)  # (B, Hkv, S)

    def plan(self, held, seen, t, unit, keys):
        if t == 1 and not self.decode:
            return None
        slack = unit - 1 if t == 1 else 0
        targets = self.scorer.layer_targets(self.target(seen), len(self.scores))
        if held <= min(targets) + slack:  # `held`: the most tokens a layer holds
            return None
        per_layer = []
        for score, n in zip(self._layer_scores(held, keys), targets):  # score (B, Hkv, tokens the layer holds)
            kept = n if score.shape[2] > n + slack else score.shape[2]  # a layer within its target keeps all
            per_layer.append(keep_index(score, kept, self.window))  # (B, Hkv, kept)
        if any(i.shape[-1] != per_layer[0].shape[-1] for i in per_layer):
            return KeepPlan(index=per_layer)  # L x (B, Hkv, K_l)
        return KeepPlan(index=torch.stack(per_layer))  # (L, B, Hkv, K)

    def _layer_scores(self, held: int, keys):
        """Each layer's score of the tokens it holds (B, Hkv, S_l)."""
        for layer in range(len(self.scores)):
            if not self.scorer.needs_queries:
                k, _ = keys(layer)
                yield self.scorer.key_score(k)  # (B, Hkv, S_l)
            else:
                yield self.scores[layer][:, :, :held]

    def kept(self, plan, held_before):
        for layer, s in enumerate(self.scores):
            if s is None:
                continue
            if plan.index is not None:
                self.scores[layer] = torch.gather(s[:, :, :held_before], 2, plan.index[layer])
            else:
                self.scores[layer] = torch.cat([s[:, :, : plan.drop_start], s[:, :, plan.drop_end : held_before]], 2)
