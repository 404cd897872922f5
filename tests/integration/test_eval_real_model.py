"""kvcache.eval on the real default model: the needle is found with the whole cache, lost outside a window."""

from __future__ import annotations

import pytest
import torch

from kvcache import LLM
from kvcache.eval import needle, perplexity
from kvcache.eval.corpus import corpus_token_ids
from kvcache.models.loader import DEFAULT_MODEL

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(2)
    return LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False)


def test_needle_found_with_full_cache_and_lost_outside_a_window(llm):
    case = needle.make_cases(llm.tokenizer, [512], [0.5], seed=0)[0]
    full = needle.answer_case(llm, case, "full")
    assert full.correct, full.output
    small = needle.answer_case(llm, case, "window:size=64", max_new_tokens=12)
    assert not small.correct and small.held < 64 + 16


def test_perplexity_is_sane_and_a_small_window_hurts(llm):
    ids = corpus_token_ids(llm.tokenizer, 256)
    full = perplexity(llm, ids, 256)
    assert 2 < full < 60
    assert perplexity(llm, ids, 256, "window:size=32") > 1.1 * full
