"""The tiny model with quantized weights against the same model holding those weights dequantized."""

from __future__ import annotations

import pytest
import torch

from kvcache.cache.dense import KVCache
from kvcache.errors import KVCacheError
from kvcache.models import weight_packing as wp
from kvcache.models.llama import LlamaModel
from kvcache.models.loader import load_model
from kvcache.models.quantized_linear import QuantizedLinear
from kvcache.models.step import StepInputs
from tests.helpers import rounded_activations

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), progress=False)


def dequantized_state(sd: dict, quantization: str) -> dict:
    """The state dict with every matrix replaced by its quantize-dequantize round trip."""
    out = dict(sd)
    for name, w in sd.items():
        if name.endswith("_proj.weight") and name.split(".")[-2] in MATRICES:
            p = wp.quantize_int4(w) if quantization == "int4" else wp.quantize_int8(w)
            out[name] = wp.dequantize(p)
    out["model.embed_tokens.weight"] = wp.dequantize(wp.quantize_table(sd["model.embed_tokens.weight"]))
    return out


def run(model: LlamaModel, prompt: torch.Tensor, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt's positions (B, T, V) and of decode steps after it (S, B, V)."""
    cache = KVCache.for_model(model, prompt.shape[0], 64)
    with torch.inference_mode():
        pre = model.forward(StepInputs(prompt, None, 0, None, "all"), cache)
        dec = [model.forward(StepInputs(torch.tensor([[t]] * prompt.shape[0]), None, cache.length, None), cache)
               for t in steps]
    return pre, torch.stack(dec)


def assert_close_but_rounding_flips(q: torch.Tensor, f: torch.Tensor, tol: float) -> None:
    """Logits equal within `tol` of their scale, save where an activation landed within an ulp of
    a rounding boundary: the two sides' float sums differ in the last bit, one rounds the other
    way, and one code step (under 1% of the block's largest value) flows on from there. Most
    logits still agree to `tol`; none by more than a few code steps."""
    scale = float(f.abs().max())
    off = (q - f).abs() > tol * scale
    assert off.float().mean() < 0.5, f"{off.float().mean():.0%} of logits differ by more than {tol} of the scale"
    torch.testing.assert_close(q, f, rtol=0, atol=max(tol, 0.05) * scale)


class RoundedInput:
    """A float32 linear layer fed the kernel's rounded activations; the result in x's dtype."""

    def __init__(self, lin: QuantizedLinear):
        self.weight = lin.dequantize(torch.float32)  # (out, in)
        self.digits = lin.activation_digits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.float().reshape(-1, x.shape[-1])  # (M, K)
        xr = rounded_activations(x2, self.digits).float().reshape(x.shape)
        return torch.nn.functional.linear(xr, self.weight).to(x.dtype)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_matches_its_dequantized_weights(loaded, quantization, dtype, one_torch_thread):
    qmodel = LlamaModel.from_state_dict(loaded.config, loaded.state_dict, dtype, quantization=quantization)
    fmodel = LlamaModel.from_state_dict(loaded.config, dequantized_state(loaded.state_dict, quantization), dtype)
    for lw, qw in zip(fmodel.layers, qmodel.layers):
        lw.qkv, lw.o, lw.gate_up, lw.down = (RoundedInput(lin) for lin in qw.linears())
    fmodel.lm_head = RoundedInput(qmodel.lm_head)
    # int8 carries each activation in two int8 digits (`quantization.ACTIVATION_DIGITS`), int4 in one
    assert {lin.activation_digits for lin in (*qmodel.layers[0].linears(), qmodel.lm_head)} == {
        2 if quantization == "int8" else 1}
    assert qmodel.quantization == quantization and isinstance(qmodel.layers[0].qkv, QuantizedLinear)
    assert qmodel.lm_head is qmodel.embed  # the tied head reads the one packed table
    prompt = torch.randint(0, loaded.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    q_pre, q_dec = run(qmodel, prompt, [5, 17, 99])
    f_pre, f_dec = run(fmodel, prompt, [5, 17, 99])
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16: one-ulp differences (0.4%) grow through the layers
    for q, f in ((q_pre, f_pre), (q_dec, f_dec)):
        assert_close_but_rounding_flips(q.float(), f.float(), tol)


def test_without_the_native_library_weights_are_dequantized_for_each_call(loaded, monkeypatch):
    from kvcache.native import qlinear

    monkeypatch.setattr(qlinear, "kernels", lambda: None)  # before the model binds its kernel calls
    qmodel = LlamaModel.from_state_dict(loaded.config, loaded.state_dict, quantization="int4")
    fmodel = LlamaModel.from_state_dict(loaded.config, dequantized_state(loaded.state_dict, "int4"))
    prompt = torch.tensor([[5, 17, 42, 8, 99, 3]])
    q_pre, q_dec = run(qmodel, prompt, [11, 23])
    f_pre, f_dec = run(fmodel, prompt, [11, 23])
    torch.testing.assert_close(q_pre, f_pre, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q_dec, f_dec, rtol=1e-4, atol=1e-4)


def test_none_is_todays_float_model_and_auto_is_none_for_a_float_checkpoint(tiny_model_dir, tiny_llm):
    import kvcache

    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, quantization="none")
    assert tiny_llm.quantization == "none" and llm.quantization == "none"
    ids = torch.tensor([[5, 17, 42, 8]])
    a, _ = run(llm.model, ids, [3])
    b, _ = run(tiny_llm.model, ids, [3])
    assert torch.equal(a, b)
    assert not any(isinstance(lin, QuantizedLinear) for lw in llm.model.layers for lin in lw.linears())
    assert tiny_llm.stats()["quantization"] == "none"


def test_llm_generates_with_int4_weights_and_reports_them(tiny_model_dir):
    import kvcache

    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, quantization="int4",
                      threads=1)
    out = llm.generate(["Once upon a time"], kvcache.SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert len(out.token_ids) >= 1
    stats = llm.stats()
    assert stats["quantization"] == "int4"
    assert stats["weight_bytes"] == llm.model.weight_bytes < LlamaModel.from_state_dict(
        llm.config, load_model(str(tiny_model_dir), progress=False).state_dict).weight_bytes / 3


def test_bad_quantization_requests_are_one_sentence(tiny_model_dir):
    import kvcache

    with pytest.raises(KVCacheError, match=r"^quantization must be one of auto, none, gguf, int8, int4, got 'int3'\.$"):
        kvcache.LLM(str(tiny_model_dir), progress=False, quantization="int3")
    with pytest.raises(KVCacheError, match=r"^quantization='gguf' keeps a GGUF file's own formats, but this model"):
        kvcache.LLM(str(tiny_model_dir), progress=False, quantization="gguf")
    with pytest.raises(KVCacheError, match=r"runs on the CPU in float32 or bfloat16, not torch.float16"):
        kvcache.LLM(str(tiny_model_dir), progress=False, quantization="int8", dtype="float16")


def test_int4_on_matrices_that_do_not_divide_into_groups(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvcache

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=24, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(KVCacheError) as err:
        kvcache.LLM(str(tmp_path), progress=False, quantization="int4")
    assert str(err.value).startswith("int4 weights quantize groups of 32 inputs, but model.layers.0.self_attn")
    assert "\n" not in str(err.value)
    assert kvcache.LLM(str(tmp_path), progress=False, quantization="int8").quantization == "int8"


@pytest.mark.parametrize("policy", ["window:size=24", "quantized:bits=4,residual=8", "sinks:n_sink=2,window=14",
                                    "evict:scorer=snapkv,ratio=0.5"])
def test_quantized_weights_run_under_kv_policies(tiny_model_dir, policy):
    import kvcache

    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, quantization="int8",
                      threads=1, kv_policy=policy, kv_cache_memory=1 << 20)
    outs = llm.generate(["Once upon a time there was", "The robot"],
                        kvcache.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [20, 20]

