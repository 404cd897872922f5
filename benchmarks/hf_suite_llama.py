"""transformers' GenerationTesterMixin tests on a tiny random Llama, for benchmarks/hf_transformers_suite.py.

The tests are transformers' own (`tests/generation/test_utils.py`, imported from the checkout
given to the runner); this module only supplies what transformers' Llama test class supplies
them: the model class and a tester that builds a tiny config and a batch of inputs, with the
sizes of transformers' text-model testers (13 rows of 7 tokens, vocabulary 99, hidden 32,
2 layers, 2 heads, an attention mask of `tril(ones)`). Which cache `generate()` builds is
decided by hf_suite_plugin's `--kv-policy`.

One test is ours: `test_kvcache_greedy_matches_dynamic_cache`, batched greedy decoding of
left-padded prompts with the default cache against transformers' DynamicCache passed in by hand,
long enough (up to 64 tokens) for the small evicting policies to evict.
"""

from __future__ import annotations

import unittest

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tests.generation.test_utils import GenerationTesterMixin  # transformers' checkout, on sys.path


class TinyLlamaTester:
    """Config and inputs in the shape transformers' causal-LM testers make them."""

    batch_size, seq_length, vocab_size = 13, 7, 99

    def __init__(self, parent: unittest.TestCase):
        self.parent = parent

    def get_config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, hidden_act="gelu",
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)

    def prepare_config_and_inputs_for_common(self) -> tuple[LlamaConfig, dict]:
        input_ids = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_length))  # (B, T)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": torch.tril(torch.ones_like(input_ids))}


class LlamaGenerationCacheTest(GenerationTesterMixin, unittest.TestCase):
    all_generative_model_classes = (LlamaForCausalLM,)
    all_model_classes = (LlamaForCausalLM,)
    has_attentions = True

    def setUp(self):
        self.model_tester = TinyLlamaTester(self)

    def test_kvcache_greedy_matches_dynamic_cache(self):
        """Greedy tokens of 4 left-padded prompts (12 to 40 tokens), 24 new each: the default cache vs
        DynamicCache, on weights drawn wider than the tester's (std 0.3) so that attention depends on the context."""
        import hf_suite_plugin

        torch.manual_seed(0)
        config = self.model_tester.get_config()
        config.initializer_range = 0.3
        model = LlamaForCausalLM(config).eval()
        lengths = [40, 12, 27, 33]
        ids = torch.full((len(lengths), max(lengths)), config.pad_token_id)  # (B, T), left-padded
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, -n:] = torch.randint(3, config.vocab_size, (n,))
            mask[row, -n:] = 1
        common = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                      return_dict_in_generate=True)
        want = model.generate(cache=DynamicCache(config=config), **common)
        got = model.generate(**common)
        expected = "DynamicCache" if hf_suite_plugin.active == hf_suite_plugin.BASELINE else "PolicyCache"
        self.assertEqual(type(got.past_key_values).__name__, expected)
        self.assertEqual(got.sequences.tolist(), want.sequences.tolist())
