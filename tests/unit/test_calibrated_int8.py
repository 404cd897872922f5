"""int8 rounding compensated against calibration activations (`models.calibrated_int8`): the
factor it rounds with, its equivalence with rounding to nearest where inputs are uncorrelated,
the smaller output error where they are not, the native loop against torch's, and the load."""

from __future__ import annotations

import pytest
import torch

import kvcache
from kvcache.models import calibrated_int8 as ci
from kvcache.models import weight_packing as wp
from kvcache.models.loader import load_model
from kvcache.native import qlinear


def correlated_inputs(t: int, k: int, samples: int = 0) -> torch.Tensor:
    """(t, k) inputs whose features share a few directions and differ in scale, as activations do;
    `samples` draws other rows from the same distribution."""
    mix = torch.randn(8, k, generator=torch.Generator().manual_seed(k))  # (8, K)
    g = torch.Generator().manual_seed(1000 + samples)
    return (torch.randn(t, 8, generator=g) @ mix + 0.3 * torch.randn(t, k, generator=g)) * torch.logspace(-1, 0.5, k)


def test_the_factor_is_upper_and_inverts_the_damped_gram_matrix():
    x = correlated_inputs(300, 96)
    h = x.T @ x
    u, dead = ci.inverse_factor(h)
    assert torch.equal(u, u.triu()) and not dead.any()
    damped = (h + ci._DAMP * h.diagonal().mean() * torch.eye(96)).double()
    torch.testing.assert_close((u.T @ u).double() @ damped, torch.eye(96, dtype=torch.float64), atol=2e-3, rtol=0)


def test_uncorrelated_inputs_round_every_weight_to_nearest():
    w = torch.randn(40, 96)
    u, dead = ci.inverse_factor(torch.diag(torch.rand(96) + 0.5))  # nothing to carry between inputs
    assert torch.equal(ci.round_int8_compensated(w, u, dead).data, wp.quantize_int8(w).data)


@pytest.mark.parametrize("native", [True, False])
def test_correlated_inputs_see_a_smaller_output_error_than_rounding_to_nearest(native, monkeypatch):
    if not native:
        monkeypatch.setattr(qlinear, "kernels", lambda: None)
    w = torch.randn(48, 160, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs(400, 160)
    u, dead = ci.inverse_factor(x.T @ x)
    compensated = wp.dequantize(ci.round_int8_compensated(w, u, dead))
    nearest = wp.dequantize(wp.quantize_int8(w))
    held_out = correlated_inputs(200, 160, samples=5)  # same distribution, other samples
    err = [((w - q) @ held_out.T).norm().item() for q in (compensated, nearest)]
    assert err[0] < 0.6 * err[1]


def test_the_native_loop_rounds_as_torch_does(monkeypatch):
    if qlinear.kernels() is None:
        pytest.skip("the native library is not built here")
    w = torch.randn(70, 200, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(300, 200)
    u, dead = ci.inverse_factor(x.T @ x)
    native = wp.dequantize(ci.round_int8_compensated(w, u, dead))
    monkeypatch.setattr(qlinear, "kernels", lambda: None)
    torch_loop = wp.dequantize(ci.round_int8_compensated(w, u, dead))
    # the same arithmetic; where torch fuses a multiply-add a code may flip
    assert (native != torch_loop).float().mean() < 0.001


def test_unseen_inputs_get_zero_weights():
    w = torch.randn(16, 64)
    x = correlated_inputs(100, 64)
    x[:, 5] = 0
    u, dead = ci.inverse_factor(x.T @ x)
    assert dead.tolist() == [i == 5 for i in range(64)]
    assert (wp.dequantize(ci.round_int8_compensated(w, u, dead))[:, 5] == 0).all()


def test_the_calibration_text_is_not_the_eval_corpus(tiny_tokenizer):
    from kvcache.eval.corpus import corpus_text

    text = ci.calibration_text()
    assert len(text) > 20_000 and corpus_text()[:500] not in text


def test_calibration_ids_are_the_texts_first_tokens_from_a_prefix_of_it(tiny_tokenizer, capfd):
    whole = tiny_tokenizer(ci.calibration_text(), add_special_tokens=False, verbose=False)["input_ids"]
    before, tiny_tokenizer.model_max_length = tiny_tokenizer.model_max_length, 64  # shorter than what is tokenized
    try:
        assert ci.calibration_ids(tiny_tokenizer, 300) == whole[:300]
    finally:
        tiny_tokenizer.model_max_length = before
    assert "sequence length is longer" not in capfd.readouterr().err
    assert ci.calibration_ids(tiny_tokenizer, 10 ** 7) == whole  # the whole text where it is shorter


def test_the_rounding_tag_names_what_int8_values_depend_on():
    assert ci.rounding_tag("gguf", None) == "gguf" and ci.rounding_tag("int4", [1, 2]) == "int4"
    assert ci.rounding_tag("int8", []) == "int8(digits=2,calibration=nearest)"
    a, b = ci.rounding_tag("int8", [1, 2, 3]), ci.rounding_tag("int8", [1, 2, 4])
    assert a.startswith("int8(digits=2,calibration=") and a != b and a == ci.rounding_tag("int8", [1, 2, 3])


def test_a_pending_projection_called_twice_runs_its_rounding_once():
    w = torch.randn(32, 64)
    pending = ci.PendingProjection([w], None, torch.float32, 2)
    x = correlated_inputs(40, 64)[None]  # (1, T, K)
    first = pending(x)
    rounded = pending.rounded
    torch.testing.assert_close(pending(x), first)
    assert pending.rounded is rounded


def test_an_int8_load_rerounds_every_projection(tiny_model_dir):
    from kvcache.models.quantized_linear import QuantizedLinear

    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", quantization="int8", progress=False)
    loaded = load_model(str(tiny_model_dir), progress=False)
    rebuilt = type(llm.model).from_state_dict(loaded.config, loaded.state_dict, quantization="int8")  # to nearest
    changed = 0
    for lw, ref in zip(llm.model.layers, rebuilt.layers):
        for lin, rlin in zip(lw.linears(), ref.linears()):
            assert isinstance(lin, QuantizedLinear) and lin.activation_digits == 2
            changed += not torch.equal(lin.parts[0].data, rlin.parts[0].data)
    assert changed == 4 * len(rebuilt.layers)
    # the fused decode step reads the re-rounded matrices, not the ones they replaced
    if llm.model.fused_layers is None:
        pytest.skip("the native library is not built here")
    packed = {lin.parts[0].data.data_ptr() for lw in llm.model.layers for lin in lw.linears()}
    assert set(llm.model.fused_layers.table[:, [1, 3, 6, 8]].flatten().tolist()) == packed


def test_without_calibration_text_int8_rounds_to_nearest(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(ci, "calibration_text", lambda: "")  # what `python -OO` leaves
    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", quantization="int8", progress=False)
    loaded = load_model(str(tiny_model_dir), progress=False)
    w = loaded.state_dict["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(llm.model.layers[0].o.parts[0].data, wp.quantize_int8(w).data)
