"""benchmarks/hf_suite_plugin.py: its patch really puts kvcache.hf's cache where transformers builds its own."""

from __future__ import annotations

import pytest
import torch

from kvcache.errors import KVCacheError

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def plugin():
    return load_benchmark("hf_suite_plugin")


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def default_caches(model) -> tuple[str, str]:
    """Class names of the cache generate() builds and of the one the model's forward builds."""
    ids = torch.tensor([[5, 6, 7, 8]])  # (1, T)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True)
    forward = model(ids, use_cache=True)
    return type(out.past_key_values).__name__, type(forward.past_key_values).__name__


def test_the_patch_puts_policy_cache_in_place_and_takes_it_back(plugin, model):
    assert default_caches(model) == ("DynamicCache", "DynamicCache")
    with plugin.patched("window:size=64"):
        assert plugin.active == "window:size=64"
        assert default_caches(model) == ("PolicyCache", "PolicyCache")
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert out.past_key_values.spec.text == "window:size=64"
    assert plugin.active == plugin.BASELINE
    assert default_caches(model) == ("DynamicCache", "DynamicCache")


def test_a_cache_given_by_the_caller_is_left_alone(plugin, model):
    from transformers import DynamicCache

    ids = torch.tensor([[5, 6, 7, 8]])
    cache = DynamicCache(config=model.config)
    with plugin.patched("full"):
        out = model.generate(ids, cache=cache, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values is cache


def test_the_baseline_patches_nothing(plugin, model):
    with plugin.patched(plugin.BASELINE):
        assert default_caches(model) == ("DynamicCache", "DynamicCache")


def test_a_bad_policy_fails_before_any_test(plugin):
    with pytest.raises(KVCacheError):
        plugin.install("window:sise=4")
    assert plugin.active == plugin.BASELINE


def test_hub_errors_read_as_skips(plugin):
    assert plugin._needs_hub(OSError("We couldn't connect to 'https://huggingface.co' to load the files"))
    assert not plugin._needs_hub(OSError("disk full"))
    assert not plugin._needs_hub(AssertionError("huggingface.co"))
