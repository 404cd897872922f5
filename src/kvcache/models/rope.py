"""Rotary position embeddings: cos/sin tables and their application to Q and K together."""

from __future__ import annotations

import math

import torch

from kvcache.errors import ModelFormatError


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair rotation frequencies (head_dim/2,), with linear or llama3 scaling if configured."""
    # float32 throughout, as transformers computes it, so both agree to the last bits
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (D/2,)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ModelFormatError(f"RoPE scaling type '{kind}' is not supported (supported: default, linear, llama3).")


class RotaryTable:
    """cos and signed-sin tables indexed by position, grown on demand.

    `apply(x, cos, sin)` rotates the last dim in the rotate-half convention:
    x*cos + roll(x, D/2)*sin_signed, where sin_signed = [-sin, sin] folds the negation in.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, length: int, device, dtype):
        self.head_dim, self.device, self.dtype = head_dim, device, dtype
        self.inv_freq = inverse_frequencies(head_dim, theta, scaling)
        self.cos = self.sin = torch.empty(0)
        self._build(max(length, 1))

    def _build(self, length: int) -> None:
        pos = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())  # (L, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        self.cos = torch.cat([cos, cos], -1).to(self.device, self.dtype)  # (L, D)
        self.sin = torch.cat([-sin, sin], -1).to(self.device, self.dtype)  # (L, D) signed
        self.length = length

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, 1, D) for integer positions (B, T)."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.length:
            self._build(max(need, 2 * self.length))
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)

    def slice(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (1, T, 1, D) for the contiguous positions start..start+length-1."""
        if start + length > self.length:
            self._build(max(start + length, 2 * self.length))
        return self.cos[start : start + length][None, :, None], self.sin[start : start + length][None, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., D) by the angles whose cos / signed sin are given (broadcastable)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
