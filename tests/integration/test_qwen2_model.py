"""A Qwen2 checkpoint (Q, K and V carry biases): our model against `transformers` on the same
weights, and the biases kept through int8's calibrated rounding."""

from __future__ import annotations

import pytest
import torch

import kvcache
from kvcache.models import weight_packing as wp
from kvcache.models.loader import load_model
from kvcache.models.step import StepInputs


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_tokenizer.save_pretrained(folder)
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(7)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases and norms away from their initial zeros and ones, so that both matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def logits(llm, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model.forward(StepInputs(ids, None, 0, None, "all"), None)[0]  # (T, V)


def test_our_qwen2_matches_transformers(qwen2_dir):
    folder, hf = qwen2_dir
    llm = kvcache.LLM(str(folder), dtype="float32", progress=False, quantization="none")
    assert llm.config.attention_bias
    ids = torch.randint(0, llm.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = hf(ids).logits[0]  # (T, V)
    torch.testing.assert_close(logits(llm, ids), want, rtol=1e-4, atol=1e-4)


def test_int8_keeps_the_qkv_biases_through_its_calibrated_rounding(qwen2_dir):
    folder, _ = qwen2_dir
    full = kvcache.LLM(str(folder), dtype="float32", progress=False, quantization="none")
    int8 = kvcache.LLM(str(folder), dtype="float32", progress=False, quantization="int8")
    qkv = int8.model.layers[0].qkv
    torch.testing.assert_close(qkv.bias, full.model.layers[0].qkv.bias.float())
    loaded = load_model(str(folder), progress=False)
    nearest = wp.quantize_int8(loaded.state_dict["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(qkv.parts[0].data[: nearest.data.shape[0]], nearest.data)  # rounded against activations
    ids = torch.randint(0, full.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    f, q = logits(full, ids), logits(int8, ids)
    assert (q - f).abs().max() < 0.05 * f.abs().max()  # int8's rounding, not a lost bias
    without_bias = q.clone()
    int8.model.layers[0].qkv.bias = None
    assert (logits(int8, ids) - without_bias).abs().max() > 0.05 * f.abs().max()  # the bias matters here
