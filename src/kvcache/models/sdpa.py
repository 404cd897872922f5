"""Grouped-query attention with torch's SDPA: the math the decoder runs over K/V it is handed,
and the reference `kvcache.cache.attention` builds every torch backend method on."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention. q (B, Hq, T, D), k/v (B, Hkv, S, D), mask bool (B, 1, T, S).

    Returns (B, T, Hq*D). The G = Hq/Hkv query heads sharing a KV head are folded into
    the query axis: (B, Hkv, G*T, D) attends to (B, Hkv, S, D) directly.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.reshape(b, hkv, g * t, d)  # (B, Hkv, G*T, D)
    if mask is not None and g > 1:
        mask = mask.repeat(1, 1, g, 1)  # (B, 1, G*T, S), row g*T + t -> query t
    o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask)  # (B, Hkv, G*T, D)
    return o.view(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)  # (B, T, Hq*D)
