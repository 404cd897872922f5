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
    assert len(ci.calibration_ids(tiny_tokenizer, 300)) == 300


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
