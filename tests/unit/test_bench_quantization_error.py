"""benchmarks/bench_quantization_error.py: the weight round trips its weights-only rows run."""

from __future__ import annotations

import torch

from kvcache.models import weight_packing as wp

from tests.helpers import load_benchmark


def test_blocks_of_32_round_to_within_half_a_step_of_their_own_scale():
    w = torch.randn(16, 64) * torch.linspace(0.1, 10, 64)  # (16, 64): blocks of very different ranges
    name = "model.layers.0.mlp.down_proj.weight"
    back = load_benchmark("bench_quantization_error").round_trip({name: w}, "block32")[name]
    step = (w.reshape(16, 2, 32).abs().amax(-1, keepdim=True) / 127).half().float()  # (16, 2, 1) fp16 scales
    err = (back - w).reshape(16, 2, 32).abs()
    assert (err <= step / 2 + 1e-6).all()
    per_row = wp.dequantize(wp.quantize_int8(w))
    assert (back - w).abs().mean() < (per_row - w).abs().mean()  # finer scales, smaller error


def test_round_trips_pack_the_table_as_the_models_do_and_keep_vectors():
    torch.manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(40, 64), "model.layers.0.mlp.down_proj.weight": torch.randn(64, 96),
          "model.norm.weight": torch.rand(64)}
    bench = load_benchmark("bench_quantization_error")
    int8 = bench.round_trip(sd, "int8")
    assert torch.equal(int8["model.norm.weight"], sd["model.norm.weight"])
    assert torch.equal(int8["model.embed_tokens.weight"],
                       wp.dequantize(wp.quantize_table(sd["model.embed_tokens.weight"])))
    assert torch.equal(int8["model.layers.0.mlp.down_proj.weight"],
                       wp.dequantize(wp.quantize_int8(sd["model.layers.0.mlp.down_proj.weight"])))
    int4 = bench.round_trip(sd, "int4")
    assert torch.equal(int4["model.layers.0.mlp.down_proj.weight"],
                       wp.dequantize(wp.quantize_int4(sd["model.layers.0.mlp.down_proj.weight"])))


def test_an_int8_models_weights_come_back_by_their_names(tiny_model_dir):
    from kvcache.models.llama import LlamaModel
    from kvcache.models.loader import load_model

    loaded = load_model(str(tiny_model_dir), progress=False)
    sd = dict(loaded.state_dict)
    model = LlamaModel.from_state_dict(loaded.config, sd, quantization="int8")  # each weight to nearest
    bench = load_benchmark("bench_quantization_error")
    back, want = bench.dequantized_state(model, sd), bench.round_trip(sd, "int8")
    for name, w in sd.items():
        if "layers." in name and w.dim() == 2:
            assert torch.equal(back[name], want[name]), name
    with bench.one_activation_digit(model):
        assert {lin.activation_digits for lin in model.layers[0].linears()} == {1}
    assert {lin.activation_digits for lin in model.layers[0].linears()} == {2}
