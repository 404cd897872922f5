"""Every decoder layer of a decode step in one native call (`models.fused_decode`) against the
layer-by-layer path it replaces: the same kernels in the same order, so the same bits."""

from __future__ import annotations

import pytest
import torch

import kvcache
from kvcache.native import ops as native
from kvcache.cache.policies.registry import POLICIES
from kvcache.engine.sampling import SamplingParams
from kvcache.native import qlinear

pytestmark = pytest.mark.skipif(qlinear.kernels() is None or not native.supports(torch.float32, "cpu"),
                                reason="the native library is not built here")

EXAMPLES = [text for cls in POLICIES.values() for text in cls.examples]
PROMPTS = [[5, 17, 33, 8, 91, 4, 12], [7, 7, 19, 44, 2, 60, 61, 62, 63, 70, 71, 72, 9, 10, 11, 3, 14, 15, 16,
                                       18, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 34], [42, 43]]


class CallCounter:
    """Wraps the model's fused call and counts the steps it ran."""

    def __init__(self, fused):
        self.fused, self.calls = fused, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fused(*args)


def run(llm, fused) -> tuple[list, list]:
    """Token ids and logprobs of three requests batched together, with the fused call or without."""
    llm.model.fused_layers = fused
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = llm.generate(PROMPTS, params)
    return [o.token_ids for o in outs], [[(lp.logprob, lp.top) for lp in o.logprobs] for o in outs]


@pytest.fixture(scope="module")
def quantized_llms(tiny_model_dir):
    return {(q, dt): kvcache.LLM(str(tiny_model_dir), dtype=dt, quantization=q, progress=False,
                                 enable_prefix_caching=False)
            for q in ("int8", "int4") for dt in ("float32", "bfloat16")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_the_fused_step_gives_the_same_bits_as_layer_by_layer(quantized_llms, quantization, dtype):
    llm = quantized_llms[(quantization, dtype)]
    fused = llm.model.fused_layers
    assert fused is not None  # every projection is one packed matrix
    counter = CallCounter(fused)
    ids, logprobs = run(llm, counter)
    assert counter.calls >= 11  # the batch's decode steps ran fused
    try:
        ref_ids, ref_logprobs = run(llm, None)
    finally:
        llm.model.fused_layers = fused
    assert ids == ref_ids
    assert logprobs == ref_logprobs  # exactly: same kernels, same order, same roundings


@pytest.mark.parametrize("policy", EXAMPLES)
def test_every_policy_gives_the_same_tokens_with_the_fused_step_offered(tiny_model_dir, policy):
    """Stores that write or attend themselves say no (`decode_blocks` None); those that run on
    plain float blocks (full, window, evicted prompts) run fused; either way the same tokens."""
    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", quantization="int8", progress=False, kv_policy=policy)
    fused = llm.model.fused_layers
    counter = CallCounter(fused)
    ids, _ = run(llm, counter)
    ref_ids, _ = run(llm, None)
    assert ids == ref_ids
    if policy in ("full", "window:size=32"):
        assert counter.calls > 0


def test_float_weights_and_mixed_parts_do_not_fuse(tiny_model_dir, quantized_llms):
    from dataclasses import replace

    from kvcache.models import weight_packing as wp
    from kvcache.models.fused_decode import FusedDecodeLayers
    from kvcache.models.quantized_linear import QuantizedLinear

    assert kvcache.LLM(str(tiny_model_dir), quantization="none", progress=False).model.fused_layers is None
    model = quantized_llms[("int8", "float32")].model
    assert FusedDecodeLayers.build(model.config, model.layers) is not None
    # a GGUF may hold an up projection in F16 beside a Q4 gate: two parts, the layer-by-layer path
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    mixed = replace(model.layers[1], gate_up=QuantizedLinear([wp.quantize_int8(gate), up]))
    assert FusedDecodeLayers.build(model.config, [model.layers[0], mixed]) is None
    # the layer table holds one activation digit count: a layer that differs runs layer by layer
    down = model.layers[1].down
    one_digit = replace(model.layers[1], down=QuantizedLinear(down.parts, None, down.dtype, activation_digits=1))
    assert FusedDecodeLayers.build(model.config, [model.layers[0], one_digit]) is None
