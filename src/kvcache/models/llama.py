"""Our Llama-family decoder (Llama, Mistral, Qwen2, SmolLM), lean for CPU decode.

Weights are plain tensors (no nn.Module per layer): Q, K and V are fused into one
projection and gate/up into another, each a `Linear` stored in the backend's fastest
layout (oneDNN-packed for bf16 on CPU); the output head is its own packed copy of the tied
embedding. With quantized weights (`quantization=`, see `kvcache.models.quantization`) the
projections are `QuantizedLinear`s over packed codes, and a tied embedding and output head
share one packed table (the embedding reads its rows). RoPE rotates Q and K in one call. Attention folds the query heads
of a KV group into the query axis, so GQA needs no repeated K/V.

On CPU in fp32/bf16, single-token (decode) steps run RMSNorm, RoPE and SwiGLU as fused
native kernels (`kvcache.native`), and a cache built by `KVCache.for_model` (or the paged engine's)
attends in place from its storage through its attention backend (`kvcache.cache.attention`);
prefill and other devices use the same steps as torch ops. With packed weights and a store
that hands over its float blocks, a decode step runs every layer in one native call
(`kvcache.models.fused_decode`), bit-identical to the loop here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcache.native import ops as native
from kvcache.models.calibrated_int8 import PendingProjection, recalibrate
from kvcache.models.config import LlamaConfig
from kvcache.models.fused_decode import FusedDecodeLayers
from kvcache.models.heap import return_freed_memory
from kvcache.models.linear import Linear, resolve_kernels
from kvcache.models.quantization import ACTIVATION_DIGITS, build_linear, build_table, check_device
from kvcache.models.quantized_linear import QuantizedLinear
from kvcache.models.rope import RotaryTable, apply_rotary
from kvcache.models.sdpa import grouped_sdpa
from kvcache.models.step import StepInputs, StepKV, causal_mask


@dataclass
class LayerWeights:
    """One decoder layer's parameters, input-major."""

    attn_norm: torch.Tensor  # (H,)
    qkv: Linear | QuantizedLinear  # H -> (Hq + 2*Hkv) * D, fused
    o: Linear | QuantizedLinear  # Hq * D -> H
    mlp_norm: torch.Tensor  # (H,)
    gate_up: Linear | QuantizedLinear  # H -> 2 * I, fused
    down: Linear | QuantizedLinear  # I -> H

    def linears(self) -> tuple[Linear | QuantizedLinear, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)


def _numel(table) -> int:
    return table.numel if isinstance(table, QuantizedLinear) else table.numel()


def _nbytes(table) -> int:
    return table.nbytes if isinstance(table, QuantizedLinear) else table.numel() * table.element_size()


class LlamaModel:
    """Decoder-only transformer whose attention reads and writes an explicit KV store passed to
    `forward`; it sees the store only through `models.step.StepKV` and imports no cache module."""

    quantization = "none"  # how the matrices are held (`kvcache.models.quantization`)

    def __init__(self, config: LlamaConfig, embed: torch.Tensor | QuantizedLinear, layers: list[LayerWeights],
                 final_norm: torch.Tensor, lm_head: Linear | QuantizedLinear, use_native: bool = True):
        self.config = config
        self.embed = embed  # (V, H), or packed codes read by rows
        self.layers = layers
        self.final_norm = final_norm  # (H,)
        self.lm_head = lm_head  # H -> V
        self.dtype, self.device = embed.dtype, embed.device
        c = config
        self.native = (use_native and native.supports(self.dtype, self.device)
                       and native.fits(c.head_dim, c.num_heads, c.num_kv_heads))
        self.rope = RotaryTable(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings,
                                self.device, self.dtype)
        self.bind_fused_layers()

    def bind_fused_layers(self) -> None:
        """Every layer of a decode step in one native call, where all projections are packed matrices
        (built again after a projection is replaced: the call holds their addresses)."""
        self.fused_layers = FusedDecodeLayers.build(self.config, self.layers) if self.native else None

    @classmethod
    def from_state_dict(cls, config: LlamaConfig, sd, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", kernels: str = "auto",
                        use_native: bool = True, quantization: str = "none", consume: bool = False,
                        calibration_ids: list[int] | None = None, progress: bool = False) -> "LlamaModel":
        """Build from Hugging Face-named weights (`model.layers.N.self_attn.q_proj.weight`, ...).

        `kernels`: "auto" | "torch" | "onednn" | "native", see `kvcache.models.linear`. `use_native=False`
        keeps every non-matmul step in torch ops (see `kvcache.native`). `quantization`: "none" |
        "gguf" (sd holds `PackedWeight`s) | "int8" | "int4", see `kvcache.models.quantization`;
        matrices are read from `sd` one at a time (a `LazyStateDict` hands them over by blocks of rows).
        `consume=True` pops each entry from `sd` as it is built, so that the parts of a fused
        projection and their joined copy are never all resident at once, and hands the heap's
        freed pages back to the OS after each layer (the load's peak stays near what it keeps).
        `calibration_ids` (under "int8"): tokens whose activations the projections' rounding is
        compensated against (`calibrated_int8`; `progress` shows a bar); without them each weight
        rounds to nearest.
        """
        device = torch.device(device)
        check_device(quantization, dtype, device)
        kernels = resolve_kernels(kernels, dtype, device)

        def take(name: str):
            return sd.pop(name) if consume else sd[name]

        def get(name: str) -> torch.Tensor:
            return take(name).to(device=device, dtype=dtype)

        calibrate = quantization == "int8" and bool(calibration_ids)

        def linear(names: list[str], bias: torch.Tensor | None) -> Linear | QuantizedLinear | PendingProjection:
            parts = [take(n) for n in names]
            if calibrate:  # rounded by `recalibrate` below
                return PendingProjection(parts, bias, dtype, ACTIVATION_DIGITS["int8"])
            return build_linear(parts, bias, quantization, dtype, device, kernels, names[0])

        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            bqkv = None
            if config.attention_bias and (a + "q_proj.bias") in sd:
                bqkv = torch.cat([get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")], 0)
            layers.append(LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                qkv=linear([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], bqkv),
                o=linear([a + "o_proj.weight"], None),
                mlp_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], None),
                down=linear([p + "mlp.down_proj.weight"], None),
            ))
            if consume:  # what building the layer freed goes back to the OS before the next is built
                return_freed_memory()
        embed = build_table(take("model.embed_tokens.weight"), quantization, dtype, device)
        if "lm_head.weight" not in sd or config.tie_word_embeddings:
            head = embed if isinstance(embed, QuantizedLinear) else Linear(embed, None, kernels)
        else:  # an untied head is packed as the embedding is
            head = build_table(take("lm_head.weight"), quantization, dtype, device)
            head = head if isinstance(head, QuantizedLinear) else Linear(head, None, kernels)
        model = cls(config, embed, layers, get("model.norm.weight"), head, use_native)
        model.quantization = quantization
        if calibrate:
            recalibrate(model, calibration_ids[: config.max_position_embeddings], progress)
            model.bind_fused_layers()
        return model

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of ids (B, T): (B, T, H) in the model dtype."""
        return self.embed.rows(ids) if isinstance(self.embed, QuantizedLinear) else self.embed[ids]

    @property
    def num_params(self) -> int:
        """Distinct parameters (the tied output head counted once)."""
        n = _numel(self.embed) + self.final_norm.numel()
        if not self.config.tie_word_embeddings:
            n += self.lm_head.numel
        for lw in self.layers:
            n += lw.attn_norm.numel() + lw.mlp_norm.numel() + sum(lin.numel for lin in lw.linears())
            n += lw.qkv.bias.numel() if lw.qkv.bias is not None else 0
        return n

    @property
    def bytes_read_per_token(self) -> int:
        """Weight bytes one decode step streams from memory (embedding row excluded, head included),
        as held: packed codes and scales for quantized matrices."""
        el = self.final_norm.element_size()
        n = self.lm_head.nbytes + self.final_norm.numel() * el
        for lw in self.layers:
            n += (lw.attn_norm.numel() + lw.mlp_norm.numel()) * el + sum(lin.nbytes for lin in lw.linears())
        return n

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take as held: a float model keeps its output head in its own layout beside the
        embedding (tied or not); a quantized one reads both from one packed table when tied."""
        return self.bytes_read_per_token + (_nbytes(self.embed) if self.lm_head is not self.embed else 0)

    def forward(self, step: StepInputs, cache: StepKV | None) -> torch.Tensor:
        """Run the decoder over step.input_ids, appending their K/V to `cache` when given.

        Returns logits (B, V) for the last position, (B, T, V) with logits_for="all", or (R, V)
        for the positions `step.logits_at`.
        """
        c = self.config
        hq, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
        ids = step.input_ids
        b, t = ids.shape
        raw_keys = observe = False
        if cache is not None:
            cache.reserve(cache.length + t)
            raw_keys, observe = cache.rotates_keys, cache.observes(t)
        # fused native ops for single-token steps, where per-op overhead dominates, and for every
        # bf16 step (its oneDNN matmuls round unlike transformers' anyway; the native ops are
        # 3-5x faster than torch's here); fp32 prompts keep torch's ops, whose rounding
        # transformers shares (its logits agree to the last bit)
        nat = self.native and (t == 1 or self.dtype != torch.float32)
        if step.positions is None:
            cos, sin = self.rope.slice(step.start_pos, t)  # (1, T, 1, D)
            if nat:
                pos = torch.arange(step.start_pos, step.start_pos + t, device=ids.device)  # (T,)
                pos = pos.repeat(b) if b > 1 else pos  # (B*T,)
        else:
            cos, sin = self.rope.lookup(step.positions)  # (B, T, 1, D)
            if nat:
                pos = step.positions.reshape(-1).to(torch.int64).contiguous()  # (B*T,)
        mask = step.attn_mask  # None means causal (a store builds it over its own keys, per layer)
        if cache is None and mask is None and t > 1:
            mask = causal_mask(None, b, 0, t, ids.device)  # (B, 1, T, T)
        x = self.embed_tokens(ids)  # (B, T, H)
        hidden = (c.hidden_size,)
        eps = c.rms_norm_eps
        n_rot = hq if raw_keys else hq + hkv  # sinks: the cache rotates keys itself, at their slots
        blocks = None  # a decode step over plain float blocks runs every layer in one native call
        if nat and t == 1 and self.fused_layers is not None and cache is not None and not raw_keys and not observe:
            blocks = cache.decode_blocks(t)
            blocks = blocks if blocks is not None and blocks.k.dtype == self.dtype else None
        if blocks is not None:
            x = self.fused_layers(x, blocks, self.rope.cos, self.rope.sin, pos)  # (B, 1, H)
        for i, lw in enumerate(self.layers if blocks is None else ()):
            h = native.rms_norm(x, lw.attn_norm, eps) if nat else F.rms_norm(x, hidden, lw.attn_norm, eps)
            qkv = lw.qkv(h).view(b, t, hq + 2 * hkv, d)  # (B, T, Hq+2Hkv, D)
            if nat:
                native.rotary_(qkv, self.rope.cos, self.rope.sin, pos, n_rot)  # in place
                q = qkv[:, :, :hq].transpose(1, 2)  # (B, Hq, T, D)
                k = qkv[:, :, hq : hq + hkv].transpose(1, 2)  # (B, Hkv, T, D)
            elif raw_keys:
                q = apply_rotary(qkv[:, :, :hq], cos, sin).transpose(1, 2)  # (B, Hq, T, D)
                k = qkv[:, :, hq : hq + hkv].transpose(1, 2)  # (B, Hkv, T, D) unrotated
            else:
                qk = apply_rotary(qkv[:, :, : hq + hkv], cos, sin)  # (B, T, Hq+Hkv, D)
                q = qk[:, :, :hq].transpose(1, 2)  # (B, Hq, T, D)
                k = qk[:, :, hq:].transpose(1, 2)  # (B, Hkv, T, D)
            v = qkv[:, :, hq + hkv :].transpose(1, 2)  # (B, Hkv, T, D)
            if cache is not None:
                k_seen, _ = cache.write(i, k, v)  # (B, Hkv, S, D), or None where read in place
                if observe:
                    cache.observe(i, q, k_seen)
                o = cache.attend(i, q, mask)  # (B, T, Hq*D): the store attends, by its backend
            else:  # no cache: the whole sequence at once (the reference path)
                o = grouped_sdpa(q, k, v, mask)  # (B, T, Hq*D)
            x = x + lw.o(o)  # (B, T, H)
            h = native.rms_norm(x, lw.mlp_norm, eps) if nat else F.rms_norm(x, hidden, lw.mlp_norm, eps)
            if nat:
                act = native.silu_mul(lw.gate_up(h))  # (B, T, I)
            else:
                gate, up = lw.gate_up(h).chunk(2, -1)  # (B, T, I) each
                act = F.silu(gate) * up
            x = x + lw.down(act)  # (B, T, H)
        if cache is not None:
            cache.advance(t)
        if step.logits_at is not None:
            x = x[0].index_select(0, step.logits_at)  # (R, H)
        elif step.logits_for == "last":
            x = x[:, -1]  # (B, H)
        x = native.rms_norm(x, self.final_norm, eps) if nat else F.rms_norm(x, hidden, self.final_norm, eps)
        return self.lm_head(x)  # (B, [T,] V)
