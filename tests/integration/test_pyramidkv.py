"""PyramidKV keeps fewer tokens, and so fewer bytes, in each deeper layer, averaging to the
policy's budget (its paths through the engine are the equivalence grid's)."""

from __future__ import annotations

import pytest
import torch

from kvcache.cache.policies.cache import SequenceCache
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.policies.scorers import make_scorer
from kvcache.models.step import StepInputs

LAYERS = 6


@pytest.fixture(scope="module")
def deep_llm(tmp_path_factory, tiny_tokenizer):
    """A random-weight model of 6 layers (the shared tiny one has 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvcache

    folder = tmp_path_factory.mktemp("deep-llama")
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return kvcache.LLM(str(folder), dtype="float32", device="cpu", progress=False)


def scorer(window: int = 8):
    return make_scorer(parse_policy(f"evict:scorer=pyramidkv,ratio=0.5,window={window}").selectors[0].params)


@pytest.mark.parametrize("target, layers", [(40, 30), (48, 6), (100, 6), (9, 4), (3, 2), (50, 1)])
def test_budgets_shrink_with_depth_and_average_to_the_target(target, layers):
    budgets = scorer().layer_targets(target, layers)
    assert len(budgets) == layers and sum(budgets) == target * layers
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and min(budgets) >= min(target, 8)
    if target > 8 and layers > 1:
        assert budgets[0] > target > budgets[-1] and budgets[-1] == max(8, target // 20)


def test_deeper_layers_hold_fewer_tokens_and_bytes(deep_llm):
    model = deep_llm.model
    ids = torch.randint(0, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(1))  # (1, 96)
    caches = {name: SequenceCache(model, f"evict:scorer={name},ratio=0.5,window=8") for name in ("pyramidkv", "snapkv")}
    with torch.inference_mode():
        for cache in caches.values():
            model.forward(StepInputs(ids, None, 0, None), cache)  # the prompt, then compressed to 48 on average
    pyramid, uniform = caches["pyramidkv"], caches["snapkv"]
    held = pyramid.layer_lengths
    assert held == scorer().layer_targets(48, LAYERS) and all(a > b for a, b in zip(held, held[1:]))
    assert uniform.layer_lengths == [48] * LAYERS
    layer_token = 2 * model.config.num_kv_heads * model.config.head_dim * 4  # K and V of a token in a layer, fp32
    assert pyramid.nbytes_used == sum(held) * layer_token == uniform.nbytes_used  # the same budget on average
    assert pyramid.nbytes_used < held[0] * LAYERS * layer_token  # not layer 0's count in every layer
    assert pyramid.nbytes_allocated == pyramid.nbytes_used  # each layer's storage shrank to what it keeps
    assert pyramid.stats()["kept"] == 48 and pyramid.stats()["evicted"] == 48
