"""What an eviction scorer is: how an `evict` policy ranks the tokens it holds.

A scorer is one class in its own file, registered by name in `scorers/__init__.py`. Every
path that runs `evict` asks it the same questions, so a new scorer runs everywhere at once:

- `update(prev, q, k)`: the one-sequence cache (`SequenceCache`, per-request rows): after a
  step's queries q, the running score of each held key (replacing or adding to `prev`);
- `first_observed(n)` and `prompt_score(mass)`: the paged engine, which scores a prompt once
  from the attention its observed queries pay (summed over prefill chunks, so the result does
  not depend on chunking) and compresses it after its last token;
- `key_score(keys)`: scorers that rank by the keys alone (`needs_queries = False`); these
  also run through `kvcache.hf`, where transformers hands a cache no queries;
- `layer_targets(target, num_layers)`: how many tokens each layer keeps when the policy keeps
  `target` (the same in every layer unless the scorer says otherwise; they average to `target`).
  A scorer whose layers keep different numbers sets `ragged_layers`: it runs on per-request
  stores that hold a length per layer, never on the paged engine's blocks.

Scores are "higher = keep": `selectors.keep_index` keeps the best-scored old tokens plus the
last `window`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch


class Scorer:
    """Base scorer; subclasses set `name` and override what they use. `params` are the
    `evict` part's keys (window, pool, ...)."""

    name: ClassVar[str] = ""
    needs_queries: ClassVar[bool] = True  # False: scores come from the keys alone (`key_score`)
    ragged_layers: ClassVar[bool] = False  # True: `layer_targets` differ by layer

    def __init__(self, params: dict):
        self.window = params.get("window", 32)  # recent tokens always kept
        self.pool = params.get("pool", 31)  # a smoothing kernel, for scorers that use one

    def update(self, prev: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The running score (B, Hkv, S) after this step's queries q (B, Hq, T, D), the last T
        of the keys k (B, Hkv, S, D). `prev` (B, Hkv, <=S) is the score before the step, or None."""
        raise NotImplementedError(f"Scorer '{self.name}' scores from the keys alone.")

    def first_observed(self, prompt_tokens: int) -> int:
        """Position of the first prompt query whose attention the paged engine sums."""
        return 0

    def prompt_score(self, mass: torch.Tensor) -> torch.Tensor:
        """A prompt's score (B, Hkv, n) from the attention mass its observed queries paid."""
        return mass

    def layer_targets(self, target: int, num_layers: int) -> list[int]:
        """Tokens each layer keeps when the policy keeps `target`; they sum to target * num_layers."""
        return [target] * num_layers

    def key_score(self, keys: torch.Tensor) -> torch.Tensor:
        """Score of keys (..., S, D) from the keys alone: (..., S). Only where needs_queries is False."""
        raise NotImplementedError(f"Scorer '{self.name}' needs the attention queries.")


def accumulate(prev: torch.Tensor | None, mass: torch.Tensor) -> torch.Tensor:
    """mass (B, Hkv, S) plus `prev` (B, Hkv, <=S) over its leading keys (the rest are new)."""
    if prev is not None:
        n = min(prev.shape[2], mass.shape[2])
        mass[:, :, :n] += prev[:, :, :n]
    return mass


def attention_mass(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention each key gets from the queries q (B, Hq, T, D), the last T of the S keys k
    (B, Hkv, S, D), causal, summed over queries and the query heads of each KV head: (B, Hkv, S) fp32."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = torch.zeros(b, hkv, s, dtype=torch.float32, device=q.device)  # (B, Hkv, S)
    for c0 in range(0, t, 256):  # query chunks bound the (B, Hkv, G*Tc, S) probabilities
        qc = q[:, :, c0 : c0 + 256].float()
        tc = qc.shape[2]
        logits = qc.reshape(b, hkv, g * tc, d) @ k.float().transpose(-1, -2) / math.sqrt(d)  # (B, Hkv, G*Tc, S)
        q_slot = torch.arange(s - t + c0, s - t + c0 + tc, device=q.device).repeat(g)  # (G*Tc,)
        logits.masked_fill_(torch.arange(s, device=q.device)[None, :] > q_slot[:, None], float("-inf"))
        acc += logits.softmax(-1).sum(2)
    return acc
