"""Weight quantization of a model: `quantization=` of `LLM` and `LlamaModel.from_state_dict`.

- "none": float weights in the model dtype (a GGUF is dequantized once and cached).
- "gguf": a GGUF's own formats kept packed (Q8_0, Q4_0, Q4_1; `gguf_weights`).
- "int8": the layers' matrices quantized at load, symmetric per output row, each projection's
  rounding compensated against the model's activations over calibration tokens where `LLM`
  loads it (`calibrated_int8`); its kernels carry each activation in two int8 digits
  (`ACTIVATION_DIGITS`), since one costs more quality than the weights' rounding
  (benchmarks/bench_quantization_error.py).
- "int4": the layers' matrices quantized at load in groups of 32 inputs (scale and minimum).
  Under both, the token embedding and output head take 8 bits with a scale per block of 32
  (`weight_packing.table_format`), as quantized GGUFs keep them.
- "auto" (the default): "gguf" for a GGUF whose matrices are quantized in the formats above,
  loaded on the CPU in float32 or bfloat16 with the native kernels built (perplexity within
  +1% of "none" on the eval corpus, see benchmarks/README.md); "none" otherwise (a float
  checkpoint, another device or dtype, a GGUF with other formats, no C compiler).
The projections run through `QuantizedLinear`; norms stay float.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvcache.errors import KVCacheError
from kvcache.models.linear import Linear
from kvcache.models.quantized_linear import QuantizedLinear
from kvcache.models.weight_packing import PackedWeight, quantize_int4, quantize_int8, quantize_table

QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4")
# int8 digits per activation in the integer kernels (1 where not named): two carry an activation
# almost exactly at twice the integer work; "int8" takes them to stay within +0.5% of "none".
ACTIVATION_DIGITS = {"int8": 2}


def auto_quantization(gguf_path: Path | None, dtype: torch.dtype, device: torch.device) -> str:
    """What "auto" runs: "gguf" where the file's packed formats can run here, else "none"."""
    if gguf_path is None or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return "none"
    from kvcache.models.gguf_file import keeps_packed
    from kvcache.native import qlinear

    return "gguf" if keeps_packed(gguf_path) and qlinear.kernels() is not None else "none"


def resolve_quantization(quantization: str | None, gguf_path: Path | None, dtype: torch.dtype,
                         device: torch.device) -> str:
    """The concrete quantization for a request and a model (`gguf_path`: the .gguf it resolves to)."""
    q = "auto" if quantization is None else str(quantization).lower()
    if q not in QUANTIZATIONS:
        raise KVCacheError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got '{quantization}'.")
    if q == "auto":
        return auto_quantization(gguf_path, dtype, device)
    if q == "gguf" and gguf_path is None:
        raise KVCacheError("quantization='gguf' keeps a GGUF file's own formats, but this model is not a GGUF "
                           "file; use int8 or int4 to quantize its float weights.")
    return q


def check_device(quantization: str, dtype: torch.dtype, device: torch.device) -> None:
    """Quantized weights run on the CPU in float32 or bfloat16."""
    if quantization == "none":
        return
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        raise KVCacheError(f"quantization='{quantization}' runs on the CPU in float32 or bfloat16, not {dtype} on "
                           f"{device}; use quantization='none'.")


def _quantize(w: torch.Tensor, quantization: str, name: str) -> PackedWeight:
    return quantize_int4(w, name) if quantization == "int4" else quantize_int8(w)


def build_linear(weights: list, bias: torch.Tensor | None, quantization: str, dtype: torch.dtype, device,
                 kernels: str, name: str) -> Linear | QuantizedLinear:
    """One (fused) projection from its parts, each (out, in): float tensors or, under "gguf",
    `PackedWeight`s too. Float parts of "gguf" stay float."""
    if quantization == "none" or (quantization == "gguf" and not any(isinstance(w, PackedWeight) for w in weights)):
        w = torch.cat([w.to(device=device, dtype=dtype) for w in weights], 0)
        return Linear(w, bias, kernels)
    if quantization in ("int8", "int4"):
        weights = [_quantize(w, quantization, f"{name} ({w.shape[0]} x {w.shape[1]})") for w in weights]
    return QuantizedLinear(weights, bias, dtype, ACTIVATION_DIGITS.get(quantization, 1))


def build_table(weight, quantization: str, dtype: torch.dtype, device) -> torch.Tensor | QuantizedLinear:
    """The token embedding (also the tied output head) or an untied output head: a float tensor,
    or packed codes whose rows `QuantizedLinear.rows` reads (`quantize_table` under "int8" and "int4")."""
    if isinstance(weight, PackedWeight):
        return QuantizedLinear([weight], None, dtype)
    if quantization in ("int8", "int4"):
        return QuantizedLinear([quantize_table(weight)], None, dtype, ACTIVATION_DIGITS.get(quantization, 1))
    return weight.to(device=device, dtype=dtype)


def describe(model) -> str:
    """What a model's matrices hold, e.g. "gguf (Q4_1 layers, Q8_0 head)"."""
    q = getattr(model, "quantization", "none")
    if q == "none":
        return "none"
    layers = sorted({getattr(lin, "formats", "float") for lw in model.layers for lin in lw.linears()})
    head = getattr(model.lm_head, "formats", "float")
    return f"{q} ({'+'.join(layers)} layers, {head} head)"
