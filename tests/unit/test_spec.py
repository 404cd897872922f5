"""Unit tests for the pure-Python KV-cache memory calculator."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from kvcache.cache import memory_table, spec
from kvcache.cache.memory_table import render_memory_report
from kvcache.cache.spec import (
    PRESETS,
    KVFormat,
    ModelShape,
    format_bytes,
    kv_bytes,
    kv_bytes_per_token,
    kv_bytes_per_token_per_layer,
    max_batch_in_budget,
    max_seq_len_in_budget,
    memory_report,
    parse_size,
    preset,
)
from tests.helpers import imported_top_modules

KiB, MiB, GiB = 2**10, 2**20, 2**30
FP16 = KVFormat.parse("fp16")
FP32 = KVFormat.parse("fp32")
SMOL = PRESETS["smollm2-135m-instruct"]
FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------- known values


def test_llama2_7b_fp16():
    shape = preset("llama-2-7b")
    assert kv_bytes_per_token(shape, FP16) == 524_288
    assert kv_bytes_per_token_per_layer(shape, FP16) == 16_384
    assert kv_bytes(shape, FP16, 1024) == 512 * MiB
    assert kv_bytes(shape, FP16, 4096) == 2 * GiB
    assert kv_bytes(shape, FP16, 1024, batch=4) == 2 * GiB


def test_llama3_8b_fp16():
    assert kv_bytes_per_token(PRESETS["llama-3-8b"], FP16) == 131_072


def test_smollm2_135m_float():
    assert kv_bytes_per_token(SMOL, FP16) == 23_040
    assert kv_bytes_per_token(SMOL, KVFormat.parse("bf16")) == 23_040
    assert kv_bytes_per_token(SMOL, FP32) == 46_080


@pytest.mark.parametrize(
    "name, bits, expected, ratio_limit",
    [
        # per layer per K: 192 values -> 192*bits/8 data bytes + 3 groups * 4 bytes
        ("int8", 8.5, 2 * 30 * (192 + 3 * 4), 0.535),
        ("int4", 4.5, 2 * 30 * (96 + 3 * 4), 0.30),
        ("int2", 2.5, 2 * 30 * (48 + 3 * 4), 0.18),
    ],
)
def test_smollm2_135m_quantized(name, bits, expected, ratio_limit):
    fmt = KVFormat.parse(name)
    assert fmt.group_size == 64 and fmt.scale_bytes == 4
    assert fmt.bits_per_value == bits
    got = kv_bytes_per_token(SMOL, fmt)
    assert got == expected
    assert got < ratio_limit * kv_bytes_per_token(SMOL, FP16)


def test_quantized_groups_round_up():
    # 1 layer, 1 kv head of 5 values, int4 group 4: ceil(20/8)=3 data bytes, 2 groups.
    shape = ModelShape("tiny", 1, 1, 1, 5, 5, 16)
    fmt = KVFormat.parse("int4", group_size=4)
    assert kv_bytes_per_token_per_layer(shape, fmt) == 2 * (3 + 2 * 4)


def test_presets_match_public_numbers():
    expected = {
        "llama-2-7b": (32, 32, 32, 128, 4096, 4096),
        "llama-2-13b": (40, 40, 40, 128, 5120, 4096),
        "llama-2-70b": (80, 64, 8, 128, 8192, 4096),
        "llama-3-8b": (32, 32, 8, 128, 4096, 8192),
        "llama-3-70b": (80, 64, 8, 128, 8192, 8192),
        "mistral-7b": (32, 32, 8, 128, 4096, 32768),
        "qwen2.5-7b": (28, 28, 4, 128, 3584, 32768),
        "smollm2-135m-instruct": (30, 9, 3, 64, 576, 8192),
        "smollm2-360m-instruct": (32, 15, 5, 64, 960, 8192),
    }
    for name, numbers in expected.items():
        s = PRESETS[name]
        assert s.name == name
        assert (
            s.num_layers,
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            s.hidden_size,
            s.max_position_embeddings,
        ) == numbers


def test_preset_lookup():
    assert preset("LLaMA-2-7B") is PRESETS["llama-2-7b"]
    assert preset("HuggingFaceTB/SmolLM2-135M-Instruct") is SMOL
    assert preset("no-such-model") is None


# ---------------------------------------------------------------- budgets

formats = st.one_of(
    st.sampled_from(["fp32", "fp16", "bf16"]).map(KVFormat.parse),
    st.builds(
        KVFormat.parse,
        st.sampled_from(["int8", "int4", "int2"]),
        group_size=st.integers(1, 256),
    ),
)


@st.composite
def shapes(draw):
    kv = draw(st.integers(1, 16))
    heads = kv * draw(st.integers(1, 8))
    head_dim = draw(st.integers(1, 256))
    return ModelShape(
        name="h",
        num_layers=draw(st.integers(1, 128)),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        hidden_size=heads * head_dim,
        max_position_embeddings=draw(st.integers(1, 2**20)),
    )


budgets = st.integers(0, 2**42)


@FAST
@given(shapes(), formats, budgets, st.integers(1, 64))
def test_max_seq_len_fits_and_next_does_not(shape, fmt, budget, batch):
    n = max_seq_len_in_budget(shape, fmt, budget, batch)
    assert n >= 0
    assert kv_bytes(shape, fmt, n, batch) <= budget
    assert kv_bytes(shape, fmt, n + 1, batch) > budget


@FAST
@given(shapes(), formats, budgets, st.integers(1, 2**16))
def test_max_batch_fits_and_next_does_not(shape, fmt, budget, seq_len):
    b = max_batch_in_budget(shape, fmt, budget, seq_len)
    assert b >= 0
    assert kv_bytes(shape, fmt, seq_len, b) <= budget
    assert kv_bytes(shape, fmt, seq_len, b + 1) > budget


@FAST
@given(shapes(), formats)
def test_bytes_per_token_consistent(shape, fmt):
    per_layer = kv_bytes_per_token_per_layer(shape, fmt)
    assert kv_bytes_per_token(shape, fmt) == shape.num_layers * per_layer
    values = 2 * shape.num_kv_heads * shape.head_dim
    # Exact count is within rounding of bits_per_value * values / 8.
    assert per_layer >= values * fmt.bits / 8
    if not fmt.is_quantized:
        assert per_layer == values * fmt.bits // 8


def test_nothing_fits_gives_zero():
    per_token = kv_bytes_per_token(SMOL, FP16)
    assert max_seq_len_in_budget(SMOL, FP16, per_token - 1) == 0
    assert max_seq_len_in_budget(SMOL, FP16, per_token) == 1
    assert max_batch_in_budget(SMOL, FP16, 0, 10) == 0


def test_budget_argument_errors():
    with pytest.raises(ValueError):
        max_seq_len_in_budget(SMOL, FP16, GiB, batch=0)
    with pytest.raises(ValueError):
        max_batch_in_budget(SMOL, FP16, GiB, seq_len=0)
    with pytest.raises(ValueError):
        max_seq_len_in_budget(SMOL, FP16, -1)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GiB", 8 * GiB),
        ("512MiB", 512 * MiB),
        ("2GB", 2_000_000_000),
        ("1.5GiB", 3 * GiB // 2),
        ("1024", 1024),
        ("64KiB", 64 * KiB),
        ("64kib", 64 * KiB),
        ("1 TiB", 2**40),
        ("3tb", 3 * 10**12),
        ("10kb", 10_000),
        ("7mb", 7_000_000),
        ("100B", 100),
        (" 2 gib ", 2 * GiB),
        ("0", 0),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "abc", "-1GiB", "1.2.3GB", "8 GiBs", "5XB", "0.5B", "1 0"])
def test_parse_size_errors(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value).endswith(".")


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(KiB) == "1.00 KiB"
    assert format_bytes(512 * MiB) == "512.00 MiB"
    assert format_bytes(2 * GiB) == "2.00 GiB"
    assert format_bytes(23_040) == "22.50 KiB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"


# ---------------------------------------------------------------- configs


def test_from_hf_config_full():
    cfg = {
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_size": 576,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "intermediate_size": 1536,
        "tie_word_embeddings": True,
    }
    s = ModelShape.from_hf_config(cfg, name="smollm2-135m-instruct")
    assert s == SMOL
    del cfg["vocab_size"], cfg["intermediate_size"], cfg["tie_word_embeddings"]
    s = ModelShape.from_hf_config(cfg)  # the weights' numbers are optional
    assert s.vocab_size is None and s.intermediate_size is None and s.tie_word_embeddings is False


def test_from_hf_config_defaults():
    cfg = {
        "_name_or_path": "meta-llama/Llama-2-7b-hf",
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_size": 4096,
        "max_position_embeddings": 4096,
        "head_dim": None,
    }
    s = ModelShape.from_hf_config(cfg)
    assert s.num_kv_heads == 32
    assert s.head_dim == 128
    assert s.name == "meta-llama/Llama-2-7b-hf"
    assert kv_bytes_per_token(s, FP16) == 524_288


def test_from_hf_config_explicit_head_dim_differs_from_hidden():
    cfg = {
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_size": 1024,
        "max_position_embeddings": 128,
    }
    assert ModelShape.from_hf_config(cfg).head_dim == 256


@pytest.mark.parametrize(
    "missing",
    ["num_hidden_layers", "num_attention_heads", "hidden_size", "max_position_embeddings"],
)
def test_from_hf_config_missing_key(missing):
    cfg = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 64,
        "max_position_embeddings": 128,
    }
    del cfg[missing]
    with pytest.raises(ValueError, match=missing):
        ModelShape.from_hf_config(cfg)


def test_model_shape_rejects_bad_numbers():
    with pytest.raises(ValueError):
        ModelShape("x", 0, 4, 4, 64, 256, 128)
    with pytest.raises(ValueError):
        ModelShape("x", 2, 6, 4, 64, 256, 128)  # heads not a multiple of kv heads


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "text, name, bits",
    [
        ("fp32", "fp32", 32),
        ("Float32", "fp32", 32),
        ("FP16", "fp16", 16),
        ("float16", "fp16", 16),
        ("half", "fp16", 16),
        ("bf16", "bf16", 16),
        ("BFloat16", "bf16", 16),
        ("INT8", "int8", 8),
        ("int4", "int4", 4),
        ("int2", "int2", 2),
    ],
)
def test_kvformat_parse(text, name, bits):
    fmt = KVFormat.parse(text)
    assert (fmt.name, fmt.bits) == (name, bits)
    if name.startswith("int"):
        assert (fmt.group_size, fmt.scale_bytes) == (64, 4)
    else:
        assert (fmt.group_size, fmt.scale_bytes) == (0, 0)
        assert fmt.bits_per_value == bits


def test_kvformat_parse_unknown_lists_names():
    with pytest.raises(ValueError) as info:
        KVFormat.parse("fp8")
    message = str(info.value)
    for name in ("fp32", "fp16", "bf16", "int8", "int4", "int2"):
        assert name in message


def test_kvformat_group_size_must_be_positive():
    with pytest.raises(ValueError):
        KVFormat.parse("int4", group_size=0)
    assert KVFormat.parse("int4", group_size=128).bits_per_value == 4.25


# ---------------------------------------------------------------- report


def test_memory_report_fields():
    r = memory_report(preset("llama-2-7b"), FP16, seq_len=4096, batch=2, budget_bytes=8 * GiB)
    assert r.total_bytes == 4 * GiB
    assert r.bytes_per_token == 524_288
    assert r.bytes_per_token_per_layer == 16_384
    assert r.num_layers == 32
    assert r.max_seq_len_at_batch == 8192
    assert r.max_batch_at_seq_len == 4
    assert r.block_size == 16
    assert r.blocks_in_budget == 8 * GiB // (16 * 524_288) == 1024
    assert r.tokens_in_budget == 16_384
    d = r.to_dict()
    assert d["dtype"] == "fp16" and d["bits_per_value"] == 16.0
    assert d["total_bytes"] == 4 * GiB


def test_memory_report_without_budget():
    r = memory_report(SMOL, KVFormat.parse("int4"))
    assert r.seq_len == 1024 and r.batch == 1
    assert r.budget_bytes is None
    assert r.max_seq_len_at_batch is None and r.blocks_in_budget is None


def _render(report) -> str:
    console = Console(record=True, width=140, color_system=None)
    console.print(render_memory_report(report))
    return console.export_text()


def test_render_memory_report():
    text = _render(memory_report(SMOL, FP16, seq_len=2048, batch=2))
    assert "23,040" in text
    assert "fp16" in text
    assert f"{23_040 * 2048 * 2:,}" in text


def test_render_memory_report_with_budget():
    r = memory_report(SMOL, KVFormat.parse("int8"), seq_len=9000, budget_bytes=GiB)
    text = _render(r)
    assert f"{r.bytes_per_token:,}" in text
    assert f"{r.max_seq_len_at_batch:,}" in text
    assert f"{r.blocks_in_budget:,}" in text
    assert "exceeds" in text  # 9000 > 8192 context


def test_no_torch_import():
    for module in (spec, memory_table):
        assert "torch" not in imported_top_modules(module.__file__), module.__name__

# ---------------------------------------------------------------- weights beside the cache

LLAMA2 = PRESETS["llama-2-7b"]


def test_preset_weights_match_the_public_parameter_counts():
    """bf16 float weights: 2 bytes a parameter, the embedding and head counted once each."""
    params = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "smollm2-135m-instruct": 134_515_008,
              "qwen2.5-7b": 7_615_616_512 - 28 * (3584 + 2 * 512)}  # Qwen2.5's q/k/v biases are not counted
    for name, n in params.items():
        shape = PRESETS[name]
        tied = shape.vocab_size * shape.hidden_size if shape.tie_word_embeddings else 0
        assert spec.weights_by_quantization(shape, "bf16")["none_bf16"] == 2 * (n + tied), name


def test_weights_by_quantization_rows():
    w = spec.weights_by_quantization(LLAMA2, "bf16")
    assert list(w) == list(spec.WEIGHT_ROWS)
    assert w["none_fp32"] == 2 * w["none_bf16"] == 4 * 6_738_415_616
    assert w["int4"] < w["int8"] < w["none_bf16"] and w["gguf"] is None  # no GGUF file for a preset
    bare = ModelShape("x", 2, 4, 2, 16, 64, 128)
    assert set(spec.weights_by_quantization(bare, "bf16").values()) == {None}


def test_budget_fields_count_the_weights_beside_the_kv_alone_ones():
    weights = spec.weights_by_quantization(LLAMA2, "bf16")
    r = memory_report(LLAMA2, FP16, seq_len=4096, batch=2, budget_bytes=16 * GiB, weights=weights,
                      weights_quantization="int4")
    # unchanged: the budget as a KV pool
    assert (r.max_seq_len_at_batch, r.max_batch_at_seq_len, r.blocks_in_budget) == (16_384, 8, 2048)
    w = weights["int4"]
    assert r.weight_bytes == w and r.weights_quantization == "int4" and r.weights_float_dtype == "bf16"
    assert r.total_with_weights_bytes == r.total_bytes + w
    assert r.kv_budget_bytes == 16 * GiB - w
    per_seq = 524_288 * 4096
    assert r.users_at_seq_len == (16 * GiB - w) // per_seq == 5
    assert r.max_seq_len_with_weights == (16 * GiB - w) // (2 * 524_288)
    assert r.users_at_seq_len_by_weights == {
        "none_fp32": 0, "none_bf16": (16 * GiB - weights["none_bf16"]) // per_seq, "int8": 4, "int4": 5, "gguf": None}
    assert spec.users_in_budget(LLAMA2, FP16, 16 * GiB, w, 4096) == 5
    assert spec.users_in_budget(LLAMA2, FP16, GiB, w, 4096) == 0  # weights past the budget: nobody


def test_weights_without_a_budget_and_the_fp32_float_parts():
    weights = spec.weights_by_quantization(LLAMA2, "fp32")
    r = memory_report(LLAMA2, FP32, weights=weights, weights_quantization="none")
    assert r.weight_bytes == weights["none_fp32"] and r.weights_float_dtype == "fp32"
    assert r.users_at_seq_len is None and r.kv_budget_bytes is None and r.users_at_seq_len_by_weights is None
    # norms are 4 bytes wide beside int8 codes in an fp32 model: (2 x 32 + 1) x 4096 more bytes than in bf16
    assert weights["int8"] - spec.weights_by_quantization(LLAMA2, "bf16")["int8"] == 65 * 4096 * 2


def test_render_memory_report_with_weights():
    weights = spec.weights_by_quantization(LLAMA2, "bf16")
    r = memory_report(LLAMA2, FP16, seq_len=4096, budget_bytes=8 * GiB, weights=weights, weights_quantization="none")
    text = _render(r)
    for row in ("none (fp32)", "none (bf16 / fp16) *", "int8", "int4", "gguf", "Users at 4,096 tokens in 8.00 GiB"):
        assert row in text
    assert f"{weights['int4']:,}" in text and f"{r.users_at_seq_len_by_weights['int4']:,}" in text
    assert "leave no room for the KV cache" in text  # 12.55 GiB of bf16 weights in 8 GiB
    assert "KV alone" in text and f"{r.max_batch_at_seq_len:,} sequences" in text
