"""PyramidKV (Cai et al., 2024): SnapKV's scores, with budgets that shrink with depth.

Lower layers spread their attention over the whole context, upper ones focus on a few tokens,
so the budget forms a pyramid: layer 0 keeps the most and each layer above keeps a fixed
number fewer, down to the top's `target / BETA` (at least the observation `window`), the
layers together keeping what a uniform budget would. Each layer holds its own number of
tokens (`ragged_layers`), so this scorer runs on per-request stores.
"""

from __future__ import annotations

from kvcache.cache.policies.scorers.snapkv import SnapKV


class PyramidKV(SnapKV):
    """SnapKV's observation-window scores; per-layer budgets decreasing arithmetically with depth."""

    name = "pyramidkv"
    ragged_layers = True
    BETA = 20  # the paper's: the top layer keeps the average budget / BETA

    def layer_targets(self, target: int, num_layers: int) -> list[int]:
        """From 2 * target - low at layer 0 down to low at the top, `low` = max(window, target // BETA)
        (never above target); rounded so that they sum to target * num_layers."""
        if num_layers == 1:
            return [target]
        low = min(target, max(self.window, target // self.BETA))
        high, den = 2 * target - low, 2 * (num_layers - 1)

        def before(layer: int) -> int:  # the budgets of the layers below `layer`, summed and rounded
            num = layer * high * den - (high - low) * layer * (layer - 1)  # / den: an arithmetic series
            return (2 * num + den) // (2 * den)

        return [before(layer + 1) - before(layer) for layer in range(num_layers)]
