"""The typed keys a policy declares (`Param`), and the key sets and checks several policies share.

Each policy class (`policies/<name>.py`) declares its keys as `Param`s; the grammar parses,
converts, checks and fills defaults from those declarations, so a key's type, default, range
and error message are written once, beside the policy that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.errors import KVCacheError


@dataclass(frozen=True)
class Param:
    """One key of a policy: its type, default and allowed values."""

    type: type
    default: object
    choices: tuple = ()
    minimum: float | None = None
    hint: str = ""  # what a valid value looks like, added to the error

    def convert(self, policy: str, key: str, text: str) -> object:
        try:
            if self.type is bool:
                low = text.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = low in ("true", "1", "yes")
            else:
                value = self.type(text)
        except ValueError:
            raise KVCacheError(
                f"Policy '{policy}': {key}={text!r} is not a valid "
                f"{getattr(self.type, 'label', self.type.__name__)}{self.hint}."
            ) from None
        if self.choices and value not in self.choices:
            raise KVCacheError(
                f"Policy '{policy}': {key} must be one of {', '.join(map(str, self.choices))}, got {text!r}."
            )
        if self.minimum is not None and value < self.minimum:
            raise KVCacheError(f"Policy '{policy}': {key} must be at least {self.minimum}, got {text!r}.")
        return value


EXACT_DTYPES = ("model", "fp32", "fp16", "bf16")  # "model": the model's own dtype
# quantizer ranges: "mse" = per group the least-error clipped range (cache/quant.py), "none" = min-max,
# "auto" = mse at 2 bits (where it halves the perplexity cost), none at 8 and 4
CLIP_MODES = ("auto", "none", "mse")
# "values": quantize each value vector times a Hadamard matrix (spreads outlier channels; head_dim a power
# of two); "keys" / "both": key vectors too, for keys grouped per token (key_axis=token; a rotation would
# mix the channels a per-channel group keeps apart); "none"; "auto" = values at 2 bits, and keys when they
# are grouped per token at 4 or 2 bits (RoPE leaves a few huge key channels that stretch a token's range)
ROTATE_MODES = ("auto", "none", "values", "keys", "both")



class LayerList(str):
    """Layer numbers separated by '/' (commas separate keys), e.g. '0/1/29', or 'none'; kept
    canonical: sorted, without repeats."""

    label = "layer list"

    def __new__(cls, text: str = "none"):
        if text.lower() == "none":
            return super().__new__(cls, "none")
        layers = sorted({int(t) for t in text.split("/")})  # int() raises ValueError on junk
        if layers[0] < 0:
            raise ValueError(text)
        return super().__new__(cls, "/".join(map(str, layers)))

    @property
    def layers(self) -> tuple[int, ...]:
        """The layer numbers (() for 'none')."""
        return () if self == "none" else tuple(int(t) for t in self.split("/"))


_LAYERS_HINT = " (layer numbers separated by '/', e.g. 0/1/29, or none)"
# mixed precision by layer: the keys (values) of these layers are held at hi_bits instead of bits
HI_PARAMS = {
    "hi_keys": Param(LayerList, LayerList(), hint=_LAYERS_HINT),
    "hi_values": Param(LayerList, LayerList(), hint=_LAYERS_HINT),
    "hi_bits": Param(int, 4, choices=(8, 4)),
}


@dataclass(frozen=True)
class QuantizerModes:
    """A quantized or tiered part's "auto" modes resolved for its bit width."""

    clip: bool  # least-error clipped ranges
    rotate_values: bool  # values quantized in a Hadamard basis
    rotate_keys: bool  # keys too (keys grouped per token only)


def quantizer_modes(params: dict, bits: int) -> QuantizerModes:
    """The clip and rotation modes of a quantized or tiered part at `bits` (its values' width; keys
    may have their own, `key_bits`), see ROTATE_MODES."""
    rotate, per_token_keys = params["rotate"], params.get("key_axis", "channel") == "token"
    key_bits = params.get("key_bits") or bits
    return QuantizerModes(
        clip=params["clip"] == "mse" or (params["clip"] == "auto" and min(bits, key_bits) == 2),  # auto: 2-bit only
        rotate_values=rotate in ("values", "both") or (rotate == "auto" and bits == 2),
        rotate_keys=rotate in ("keys", "both") or (rotate == "auto" and key_bits <= 4 and per_token_keys))


def check_quantizer_keys(name: str, params: dict, bits: int) -> None:
    """Cross-key checks of a quantized or tiered part (`bits`: its values' width)."""
    if params["rotate"] in ("keys", "both") and params.get("key_axis", "channel") != "token":
        raise KVCacheError(f"Policy '{name}': rotate={params['rotate']} needs keys grouped per token "
                           "(key_axis=token); per-channel key groups must keep their channels apart.")
    if params["hi_keys"] != "none" or params["hi_values"] != "none":
        widest = max(bits, params.get("key_bits", 0))
        if params["hi_bits"] <= widest:
            raise KVCacheError(f"Policy '{name}': hi_bits ({params['hi_bits']}) must be above the "
                               f"other layers' {widest} bits.")
