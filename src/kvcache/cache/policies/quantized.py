"""`quantized:bits=8|4|2,...`: hold the kept tokens as quantized codes (KIVI, or llama.cpp's layout)."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvcache.cache.policies.base import Policy
from kvcache.cache.policies.footprint import PolicyFootprint
from kvcache.cache.policies.params import (CLIP_MODES, EXACT_DTYPES, HI_PARAMS, ROTATE_MODES, Param,
                                           check_quantizer_keys)

# At 2 bits the first tokens (attention sinks) are worth keeping exact: on held-out text at 1k tokens,
# quantized:bits=2,group_size=64,residual=128 cost +85% perplexity and the same with n_sink=4 +1.1%.
SINKS_AT_2_BITS = 4


class Quantized(Policy):
    """Sinks exact + a quantized middle + an exact recent tail (`quantized_store.QuantizedKVStore`).

    `n_sink` defaults to 4 at 2 bits with KIVI's per-channel keys (see SINKS_AT_2_BITS) and to 0
    otherwise; with keys grouped per token, residual=0 and n_sink=0 every token is quantized as it
    is written and the paged engine holds the codes in its blocks (`cache/paged_quant.py`)."""

    name = "quantized"
    role = "store"
    params: ClassVar[dict[str, Param]] = {
        "bits": Param(int, 8, choices=(8, 4, 2)),
        "group_size": Param(int, 64, minimum=1),
        "residual": Param(int, 128, minimum=0),  # last tokens kept exact
        "n_sink": Param(int, 0, minimum=0),  # first tokens kept exact (default: see `fill`)
        "exact": Param(str, "model", choices=EXACT_DTYPES),  # dtype of the exact tokens
        "clip": Param(str, "auto", choices=CLIP_MODES),
        "rotate": Param(str, "auto", choices=ROTATE_MODES),
        "value_group_size": Param(int, 0, minimum=0),  # channels per value group; 0: group_size if it divides head_dim
        # "channel": KIVI keys, groups of group_size tokens per channel; "token": keys grouped like values
        # (group_size channels of one token, llama.cpp's q8_0/q4_0 layout); with residual=0 and n_sink=0
        # every token is quantized as it is written, and the paged engine runs the policy
        "key_axis": Param(str, "channel", choices=("channel", "token")),
        "key_bits": Param(int, 0, choices=(0, 8, 4, 2)),  # the keys' own width (e.g. 8 over 4-bit values); 0: bits
        **HI_PARAMS,
    }
    examples = ("quantized:bits=4,group_size=16,residual=16", "quantized:bits=2,group_size=16,residual=8",
                "quantized:bits=8,group_size=16,key_axis=token,residual=0",
                "quantized:bits=4,group_size=16,key_axis=token,residual=0")

    @classmethod
    def fill(cls, given: dict) -> dict:
        params = super().fill(given)
        if "n_sink" not in given and params["bits"] == 2 and params["key_axis"] == "channel":
            params["n_sink"] = SINKS_AT_2_BITS
        return params

    @classmethod
    def code_bits(cls, params: dict) -> int:
        """The width its packed tokens take (`layer_bits`: per layer, with `hi_bits` where named)."""
        return params["bits"]

    @classmethod
    def check(cls, params: dict) -> None:
        check_quantizer_keys(cls.name, params, cls.code_bits(params))

    @classmethod
    def on_paged_blocks(cls, params: dict) -> bool:
        """Keys and values grouped per token, every token quantized as it is written (no exact
        tail or sinks), one code width for every layer."""
        p = params
        return (p["key_axis"] == "token" and p["residual"] == 0 and p["n_sink"] == 0
                and p["hi_keys"] == "none" and p["hi_values"] == "none")

    @classmethod
    def make_store(cls, part, config, dtype: torch.dtype, device: torch.device, capacity: int):
        from kvcache.cache.policies.full import exact_dtype
        from kvcache.cache.policies.quantized_store import QuantizedKVStore, quantizer_args

        c, p = config, part.params
        bits, extra, modes = quantizer_args(part, c)
        return QuantizedKVStore(c.num_layers, c.num_kv_heads, c.head_dim, bits, p["group_size"], p["residual"],
                                p["n_sink"], dtype, device, capacity, exact_dtype(part, dtype),
                                key_axis=p["key_axis"], rotate_keys=modes.rotate_keys, **extra)

    @classmethod
    def footprint(cls, part, config, dtype: torch.dtype) -> PolicyFootprint:
        """Packed codes, plus exact sinks, the residual tail and a key group still filling."""
        from kvcache.cache.policies.full import exact_token_bytes
        from kvcache.cache.policies.quantized_store import packed_rate

        p = part.params
        rate, tokens = packed_rate(part, config, per_channel=p["key_axis"] == "channel")
        return PolicyFootprint(rate, exact_token_bytes(part, config, dtype), p["residual"] + p["n_sink"] + tokens - 1)

    @classmethod
    def paged_format(cls, part, head_dim: int):
        from kvcache.cache.paged_quant import TokenQuantFormat

        return TokenQuantFormat.from_part(part, head_dim)

    @classmethod
    def paged_token_bytes(cls, part, config, dtype: torch.dtype) -> int:
        """Codes, scales and zero points of one token, every layer (`on_paged_blocks`)."""
        c = config
        return cls.paged_format(part, c.head_dim).bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim)
