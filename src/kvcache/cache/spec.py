"""KV-cache memory calculator: exact byte counts, no torch.

During decoding a transformer keeps, for every token it has seen, a key and a
value vector in every attention layer.  With grouped-query attention only the
``num_kv_heads`` key/value heads are stored, so for floating-point formats::

    bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per value

and the cache for a batch of sequences is ``bytes per token x seq_len x batch``.
For example Llama-2-7B in fp16 needs 2 x 32 x 32 x 128 x 2 = 524,288 bytes
(512 KiB) per token, i.e. 512 MiB for 1,024 tokens.

Quantized formats (int8, int4, int2) also store metadata: the ``kv_heads x
head_dim`` values of one token's K (or V) in one layer are split into
``ceil(kv_heads x head_dim / group_size)`` groups and each group carries a fp16
scale and a fp16 zero point (4 bytes).  Per layer and token, K (or V) therefore
takes ``ceil(kv_heads x head_dim x bits / 8) + groups x 4`` bytes; with
groups of 64 that is 8.5, 4.5 and 2.5 bits per value for int8, int4 and int2.

The weights share a machine's memory with the cache: :func:`weights_by_quantization` gives
their exact bytes under each quantization (``kvcache.models.weight_bytes``), and a report
with a budget counts how many sequences fit beside them.

Everything here returns exact integers; :func:`format_bytes` is only for display.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from kvcache.errors import KVCacheError

__all__ = [
    "ModelShape",
    "KVFormat",
    "FORMAT_NAMES",
    "kv_bytes_per_token",
    "kv_bytes_per_token_per_layer",
    "kv_bytes",
    "QUANT_AXES",
    "kv_tensor_bytes",
    "kv_layers_bytes",
    "max_seq_len_in_budget",
    "max_batch_in_budget",
    "parse_size",
    "format_bytes",
    "PRESETS",
    "preset",
    "MemoryReport",
    "memory_report",
    "model_shape",
    "model_gguf",
    "auto_weights",
    "WEIGHT_ROWS",
    "weight_row",
    "weights_float_dtype",
    "weights_bytes",
    "weights_by_quantization",
    "users_in_budget",
]


def _check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KVCacheError(f"{what} must be a positive integer, got {value!r}.")


# --------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers that decide the size of a model's KV cache, and of its weights
    (``vocab_size``, ``intermediate_size``, ``tie_word_embeddings``; optional: without them the
    weights' bytes are not known)."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_position_embeddings: int
    vocab_size: int | None = None
    intermediate_size: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in (
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "hidden_size",
            "max_position_embeddings",
        ):
            _check_positive_int(getattr(self, field), field)
        for field in ("vocab_size", "intermediate_size"):
            if getattr(self, field) is not None:
                _check_positive_int(getattr(self, field), field)
        if self.num_heads % self.num_kv_heads != 0:
            raise KVCacheError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})."
            )

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "") -> "ModelShape":
        """Build a shape from a Hugging Face ``config.json`` dict.

        ``num_key_value_heads`` defaults to ``num_attention_heads`` and
        ``head_dim`` (absent or ``None``) to ``hidden_size // num_attention_heads``;
        ``vocab_size`` and ``intermediate_size`` are optional, ``tie_word_embeddings``
        defaults to false (as the model loader reads it).
        Raises ``ValueError`` naming the first missing required key.
        """
        if not isinstance(cfg, dict):
            raise KVCacheError(f"The model config must be a dict, got {type(cfg).__name__}.")

        def required(key: str) -> int:
            value = cfg.get(key)
            if value is None:
                raise KVCacheError(f"The model config is missing the required key '{key}'.")
            _check_positive_int(value, key)
            return value

        num_layers = required("num_hidden_layers")
        num_heads = required("num_attention_heads")
        hidden_size = required("hidden_size")
        max_pos = required("max_position_embeddings")
        num_kv_heads = cfg.get("num_key_value_heads")
        if num_kv_heads is None:
            num_kv_heads = num_heads
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            head_dim = hidden_size // num_heads
        if not name:
            name = str(cfg.get("_name_or_path") or cfg.get("model_type") or "")
        return cls(
            name=name,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            hidden_size=hidden_size,
            max_position_embeddings=max_pos,
            vocab_size=cfg.get("vocab_size"),
            intermediate_size=cfg.get("intermediate_size"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


# --------------------------------------------------------------------------
# Storage format
# --------------------------------------------------------------------------

# canonical name -> (bits, is_integer_format)
_FORMATS: dict[str, tuple[int, bool]] = {
    "fp32": (32, False),
    "fp16": (16, False),
    "bf16": (16, False),
    "int8": (8, True),
    "int4": (4, True),
    "int2": (2, True),
}
_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}
#: Canonical KV format names, widest first.
FORMAT_NAMES: tuple[str, ...] = tuple(_FORMATS)
#: Bytes of metadata per quantization group: a fp16 scale plus a fp16 zero point.
INT_SCALE_BYTES = 4


@dataclass(frozen=True)
class KVFormat:
    """How one K or V value is stored: bit width plus per-group metadata."""

    name: str
    bits: int
    group_size: int = 0
    scale_bytes: int = 0

    def __post_init__(self) -> None:
        if self.name not in _FORMATS:
            raise KVCacheError(
                f"Unknown KV format '{self.name}'; valid names are {', '.join(FORMAT_NAMES)}."
            )
        bits, is_int = _FORMATS[self.name]
        if self.bits != bits:
            raise KVCacheError(f"Format {self.name} has {bits} bits, not {self.bits}.")
        if is_int:
            _check_positive_int(self.group_size, "group_size")
            if isinstance(self.scale_bytes, bool) or not isinstance(self.scale_bytes, int) \
                    or self.scale_bytes < 0:
                raise KVCacheError(
                    f"scale_bytes must be a non-negative integer, got {self.scale_bytes!r}."
                )
        elif self.group_size != 0 or self.scale_bytes != 0:
            raise KVCacheError(f"Float format {self.name} takes no group_size or scale_bytes.")

    @classmethod
    def parse(cls, text: str, group_size: int = 64) -> "KVFormat":
        """Parse a format name (case-insensitive), e.g. ``fp16``, ``bfloat16``, ``int4``.

        ``group_size`` applies to the integer formats only.
        """
        key = str(text).strip().lower()
        key = _ALIASES.get(key, key)
        if key not in _FORMATS:
            raise KVCacheError(
                f"Unknown KV format '{text}'; valid names are {', '.join(FORMAT_NAMES)} "
                f"(aliases: {', '.join(_ALIASES)})."
            )
        bits, is_int = _FORMATS[key]
        if is_int:
            return cls(key, bits, group_size, INT_SCALE_BYTES)
        return cls(key, bits, 0, 0)

    @property
    def is_quantized(self) -> bool:
        """True for the integer formats, which carry scales and zero points."""
        return self.group_size > 0

    @property
    def bits_per_value(self) -> float:
        """Average storage bits per value, metadata included (int4 g64 -> 4.5)."""
        if not self.is_quantized:
            return float(self.bits)
        return self.bits + 8 * self.scale_bytes / self.group_size


# --------------------------------------------------------------------------
# Byte counts
# --------------------------------------------------------------------------


def kv_bytes_per_token_per_layer(shape: ModelShape, fmt: KVFormat) -> int:
    """Bytes one token adds to one layer's cache (K and V together)."""
    values = shape.num_kv_heads * shape.head_dim
    data = -(-values * fmt.bits // 8)  # ceil
    groups = -(-values // fmt.group_size) if fmt.is_quantized else 0
    return 2 * (data + groups * fmt.scale_bytes)


def kv_bytes_per_token(shape: ModelShape, fmt: KVFormat) -> int:
    """Bytes one token adds to the cache across all layers (K and V)."""
    return shape.num_layers * kv_bytes_per_token_per_layer(shape, fmt)


def _check_count(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KVCacheError(f"{what} must be a non-negative integer, got {value!r}.")


#: Grouping axes of the integer formats (KIVI): ``"channel"`` groups ``group_size``
#: consecutive tokens of one channel (keys), ``"token"`` groups ``group_size``
#: consecutive channels of one token (values).
QUANT_AXES: tuple[str, ...] = ("channel", "token")


def kv_tensor_bytes(
    fmt: KVFormat,
    num_tokens: int,
    kv_heads: int,
    head_dim: int,
    axis: str = "token",
    batch: int = 1,
) -> int:
    """Exact bytes of one layer's K (or V) for ``num_tokens`` tokens, as ``cache/quant.py`` stores it.

    Codes are packed along ``head_dim`` (``ceil(head_dim x bits / 8)`` bytes per token and
    head); a quantization group takes ``scale_bytes``. Along ``"channel"`` a group is
    ``group_size`` tokens of one channel (a last partial group still costs a whole group's
    metadata); along ``"token"`` it is ``group_size`` channels of one token. With
    ``group_size`` dividing ``head_dim`` and whole token groups, K per channel plus V per
    token equals ``num_tokens x kv_bytes_per_token_per_layer``. Float formats ignore ``axis``.
    """
    _check_count(num_tokens, "num_tokens")
    _check_positive_int(kv_heads, "kv_heads")
    _check_positive_int(head_dim, "head_dim")
    _check_positive_int(batch, "batch")
    if axis not in QUANT_AXES:
        raise KVCacheError(f"axis must be one of {', '.join(QUANT_AXES)}, got {axis!r}.")
    rows = batch * kv_heads * num_tokens  # one row = head_dim values of one token and head
    data = rows * (-(-head_dim * fmt.bits // 8))
    if not fmt.is_quantized:
        return data
    if axis == "channel":
        groups = batch * kv_heads * head_dim * -(-num_tokens // fmt.group_size)
    else:
        groups = rows * -(-head_dim // fmt.group_size)
    return data + groups * fmt.scale_bytes


def kv_layers_bytes(layer_bits: tuple[int, ...], group_size: int, num_tokens: int, kv_heads: int, head_dim: int,
                    axis: str = "token", batch: int = 1) -> int:
    """Exact bytes of K (or V) over layers held at ``layer_bits[i]`` bits each (integer formats,
    mixed precision by layer): the sum of :func:`kv_tensor_bytes` layer by layer."""
    return sum(kv_tensor_bytes(KVFormat.parse(f"int{b}", group_size), num_tokens, kv_heads, head_dim, axis, batch)
               for b in layer_bits)


def kv_bytes(shape: ModelShape, fmt: KVFormat, seq_len: int, batch: int = 1) -> int:
    """Bytes of cache for ``batch`` sequences of ``seq_len`` tokens each."""
    _check_count(seq_len, "seq_len")
    _check_count(batch, "batch")
    return kv_bytes_per_token(shape, fmt) * seq_len * batch


def max_seq_len_in_budget(
    shape: ModelShape, fmt: KVFormat, budget_bytes: int, batch: int = 1
) -> int:
    """Longest sequence length whose cache for ``batch`` sequences fits the budget (0 if none)."""
    _check_count(budget_bytes, "budget_bytes")
    _check_positive_int(batch, "batch")
    return budget_bytes // (kv_bytes_per_token(shape, fmt) * batch)


def max_batch_in_budget(
    shape: ModelShape, fmt: KVFormat, budget_bytes: int, seq_len: int
) -> int:
    """Largest batch of ``seq_len``-token sequences whose cache fits the budget (0 if none)."""
    _check_count(budget_bytes, "budget_bytes")
    _check_positive_int(seq_len, "seq_len")
    return budget_bytes // (kv_bytes_per_token(shape, fmt) * seq_len)


# --------------------------------------------------------------------------
# Sizes as text
# --------------------------------------------------------------------------

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a size such as ``8GiB``, ``512MiB``, ``2GB`` (decimal), ``1.5GiB`` or ``1024`` to bytes."""
    if isinstance(text, bool):
        raise KVCacheError(f"Cannot read {text!r} as a size.")
    if isinstance(text, int):
        if text < 0:
            raise KVCacheError(f"A size cannot be negative, got {text}.")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise KVCacheError(
            f"Cannot read '{text}' as a size; use a number with an optional unit "
            "such as 1024, 64KiB, 512MiB, 8GiB or 2GB."
        )
    number, unit = match.groups()
    multiplier = _UNITS.get(unit.lower())
    if multiplier is None:
        raise KVCacheError(
            f"Unknown size unit '{unit}' in '{text}'; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB."
        )
    size = Fraction(number) * multiplier
    if size.denominator != 1:
        raise KVCacheError(f"The size '{text}' is not a whole number of bytes.")
    return int(size)


_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int) -> str:
    """Human-readable binary size: ``"512 B"``, ``"512.00 MiB"``, ``"2.00 GiB"``."""
    n = int(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{n} B"
    value = float(n)
    unit = "B"
    for unit in _BINARY_UNITS:
        value /= 1024
        if value < 1024:
            break
    return f"{sign}{value:.2f} {unit}"


# --------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------


def _shape(name: str, layers: int, heads: int, kv: int, hd: int, hidden: int, ctx: int, vocab: int,
           intermediate: int, tied: bool = False) -> ModelShape:
    return ModelShape(name, layers, heads, kv, hd, hidden, ctx, vocab, intermediate, tied)


#: Public architecture numbers of common models (their config.json), keyed by lower-case name.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _shape("llama-2-7b", 32, 32, 32, 128, 4096, 4096, 32000, 11008),
        _shape("llama-2-13b", 40, 40, 40, 128, 5120, 4096, 32000, 13824),
        _shape("llama-2-70b", 80, 64, 8, 128, 8192, 4096, 32000, 28672),
        _shape("llama-3-8b", 32, 32, 8, 128, 4096, 8192, 128256, 14336),
        _shape("llama-3-70b", 80, 64, 8, 128, 8192, 8192, 128256, 28672),
        _shape("mistral-7b", 32, 32, 8, 128, 4096, 32768, 32000, 14336),
        _shape("qwen2.5-7b", 28, 28, 4, 128, 3584, 32768, 152064, 18944),
        _shape("smollm2-135m-instruct", 30, 9, 3, 64, 576, 8192, 49152, 1536, tied=True),
        _shape("smollm2-360m-instruct", 32, 15, 5, 64, 960, 8192, 49152, 2560, tied=True),
    )
}


def preset(name: str) -> ModelShape | None:
    """Look up a preset by name, case-insensitively; ``None`` if unknown.

    A Hugging Face repo id's organisation prefix is ignored
    (``HuggingFaceTB/SmolLM2-135M-Instruct`` finds ``smollm2-135m-instruct``).
    """
    key = str(name).strip().lower()
    found = PRESETS.get(key)
    if found is None and "/" in key:
        found = PRESETS.get(key.rsplit("/", 1)[1])
    return found


def model_shape(name: str) -> ModelShape:
    """The `ModelShape` of a preset, a config.json path, or any name the model loader accepts.

    Presets and config files need no weights; a .gguf is read for its metadata only.
    """
    import json
    from pathlib import Path

    from kvcache.errors import ModelFormatError, ModelNotFoundError
    from kvcache.models.loader import read_hf_config, resolve_model_dir

    found = preset(name)
    if found is not None:
        return found
    path = Path(name).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"Could not read {path} as JSON ({exc}).") from None
        return ModelShape.from_hf_config(cfg, name=path.parent.name or path.stem)
    if path.is_file() and path.suffix == ".gguf":
        from kvcache.models.gguf_convert import gguf_config

        return ModelShape.from_hf_config(gguf_config(path), name=path.stem)
    try:
        model_dir = resolve_model_dir(name)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"Unknown model '{name}': give a preset ({', '.join(sorted(PRESETS))}), a config.json, "
            "a .gguf file, a model folder or a hub id."
        ) from None
    return ModelShape.from_hf_config(read_hf_config(model_dir), name=name)


def model_gguf(name: str) -> Any:
    """The GGUF file (a `Path`) a model name stands for: a .gguf path or the packaged default
    model where its package is installed; None otherwise."""
    from kvcache.models.loader import gguf_file

    try:
        return gguf_file(name)
    except KVCacheError:
        return None


def auto_weights(gguf: Any, fmt: KVFormat) -> str:
    """The quantization `LLM(model, dtype=...)` picks for a model whose KV cache is in ``fmt``
    (the model dtype: fp32 for an fp32 cache, fp16 for fp16, else bf16): "gguf" for a GGUF whose
    matrices are kept packed, in fp32 or bf16, where the native kernels can be built (a C
    compiler; they are not built here); "none" otherwise."""
    if gguf is None or fmt.name == "fp16":
        return "none"
    from kvcache.models.gguf_file import keeps_packed
    from kvcache.native.build import wanted

    return "gguf" if keeps_packed(gguf) and wanted() else "none"


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


@dataclass
class MemoryReport:
    """Everything the CLI shows about one model's KV cache in one format."""

    model: str
    dtype: str
    bits_per_value: float
    seq_len: int
    batch: int
    bytes_per_token: int
    bytes_per_token_per_layer: int
    num_layers: int
    total_bytes: int
    budget_bytes: int | None = None
    max_seq_len_at_batch: int | None = None
    max_batch_at_seq_len: int | None = None
    block_size: int | None = None
    blocks_in_budget: int | None = None
    tokens_in_budget: int | None = None
    max_position_embeddings: int | None = None
    # The weights (None where not known). The budget fields above count the KV cache alone (the
    # budget as a KV pool, as `--kv-cache-memory`); the ones below count the weights too.
    weights: dict[str, int | None] | None = None  # WEIGHT_ROWS -> bytes, None where n/a
    weights_quantization: str | None = None  # the row the budget is shared with, e.g. "int4"
    weights_float_dtype: str | None = None  # the float parts' dtype: "fp32" or "bf16"
    weight_bytes: int | None = None
    total_with_weights_bytes: int | None = None  # total_bytes + weight_bytes
    kv_budget_bytes: int | None = None  # budget - weight_bytes (0 when the weights do not fit)
    users_at_seq_len: int | None = None  # sequences of seq_len tokens beside the weights
    max_seq_len_with_weights: int | None = None  # at `batch`, beside the weights
    users_at_seq_len_by_weights: dict[str, int | None] | None = None  # WEIGHT_ROWS -> users

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain JSON-serialisable dict."""
        return dataclasses.asdict(self)


#: The weight rows of a report: float weights at 4 and 2 bytes, and the quantizations.
WEIGHT_ROWS: tuple[str, ...] = ("none_fp32", "none_bf16", "int8", "int4", "gguf")


def weights_float_dtype(fmt: KVFormat) -> str:
    """The dtype of a model whose KV cache is in ``fmt``: fp32 for an fp32 cache, else a 16-bit
    one (bf16 and fp16 weights take the same bytes)."""
    return "fp32" if fmt.name == "fp32" else "bf16"


def weight_row(quantization: str, float_dtype: str) -> str:
    """The `WEIGHT_ROWS` key of a quantization whose float parts are in ``float_dtype``."""
    return f"none_{float_dtype}" if quantization == "none" else quantization


def weights_bytes(shape: ModelShape, quantization: str, float_dtype: str, gguf: Any = None) -> int:
    """Bytes of the weights under ``quantization`` ("none", "int8", "int4", "gguf" of the file
    ``gguf``), float parts in ``float_dtype`` ("fp32" or "bf16"); `KVCacheError` where n/a."""
    from kvcache.models.weight_bytes import weight_bytes

    return weight_bytes(shape, quantization, 4 if float_dtype == "fp32" else 2, gguf)


def weights_by_quantization(shape: ModelShape, float_dtype: str, gguf: Any = None) -> dict[str, int | None]:
    """Bytes of the weights per `WEIGHT_ROWS` key (None where the count does not apply: an int4
    model whose matrices do not divide into groups, no GGUF file, a GGUF type not kept packed,
    a shape without vocab_size or intermediate_size). The quantized rows hold their float parts
    (norms; a GGUF's float tensors) in ``float_dtype``."""
    out: dict[str, int | None] = {}
    for row in WEIGHT_ROWS:
        q, dtype = ("none", row[len("none_"):]) if row.startswith("none_") else (row, float_dtype)
        try:
            out[row] = weights_bytes(shape, q, dtype, gguf)
        except KVCacheError:
            out[row] = None
    return out


def users_in_budget(shape: ModelShape, fmt: KVFormat, budget_bytes: int, weight_bytes: int, seq_len: int) -> int:
    """Sequences of ``seq_len`` tokens whose cache fits the budget beside the weights (0 if none)."""
    _check_count(weight_bytes, "weight_bytes")
    return max_batch_in_budget(shape, fmt, max(0, budget_bytes - weight_bytes), seq_len)


def memory_report(
    shape: ModelShape,
    fmt: KVFormat,
    seq_len: int = 1024,
    batch: int = 1,
    budget_bytes: int | None = None,
    block_size: int = 16,
    weights: dict[str, int | None] | None = None,
    weights_quantization: str | None = None,
) -> MemoryReport:
    """Compute a :class:`MemoryReport`; budget fields are filled only when a budget is given.

    ``blocks_in_budget`` counts whole blocks of ``block_size`` tokens that fit the
    budget (a paged cache's capacity); ``tokens_in_budget`` is that times ``block_size``.
    With ``weights`` (`weights_by_quantization`) and a budget, ``users_at_seq_len`` and
    ``max_seq_len_with_weights`` count what fits beside the ``weights_quantization`` weights
    ("none", "int8", "int4" or "gguf"; their float parts in `weights_float_dtype`), and
    ``users_at_seq_len_by_weights`` does so for every row.
    """
    _check_positive_int(seq_len, "seq_len")
    _check_positive_int(batch, "batch")
    _check_positive_int(block_size, "block_size")
    per_token = kv_bytes_per_token(shape, fmt)
    report = MemoryReport(
        model=shape.name,
        dtype=fmt.name,
        bits_per_value=fmt.bits_per_value,
        seq_len=seq_len,
        batch=batch,
        bytes_per_token=per_token,
        bytes_per_token_per_layer=kv_bytes_per_token_per_layer(shape, fmt),
        num_layers=shape.num_layers,
        total_bytes=per_token * seq_len * batch,
        block_size=block_size,
        max_position_embeddings=shape.max_position_embeddings,
    )
    if budget_bytes is not None:
        _check_count(budget_bytes, "budget_bytes")
        blocks = budget_bytes // (block_size * per_token)
        report.budget_bytes = budget_bytes
        report.max_seq_len_at_batch = max_seq_len_in_budget(shape, fmt, budget_bytes, batch)
        report.max_batch_at_seq_len = max_batch_in_budget(shape, fmt, budget_bytes, seq_len)
        report.blocks_in_budget = blocks
        report.tokens_in_budget = blocks * block_size
    if weights is not None:
        _add_weights(report, shape, fmt, weights, weights_quantization or "none")
    return report


def _add_weights(report: MemoryReport, shape: ModelShape, fmt: KVFormat, weights: dict[str, int | None],
                 quantization: str) -> None:
    float_dtype = weights_float_dtype(fmt)
    report.weights = dict(weights)
    report.weights_quantization = quantization
    report.weights_float_dtype = float_dtype
    report.weight_bytes = weights.get(weight_row(quantization, float_dtype))
    if report.weight_bytes is not None:
        report.total_with_weights_bytes = report.total_bytes + report.weight_bytes
    budget = report.budget_bytes
    if budget is None:
        return
    report.users_at_seq_len_by_weights = {
        row: None if w is None else users_in_budget(shape, fmt, budget, w, report.seq_len)
        for row, w in weights.items()}
    if report.weight_bytes is not None:
        report.kv_budget_bytes = max(0, budget - report.weight_bytes)
        report.users_at_seq_len = max_batch_in_budget(shape, fmt, report.kv_budget_bytes, report.seq_len)
        report.max_seq_len_with_weights = max_seq_len_in_budget(shape, fmt, report.kv_budget_bytes, report.batch)
