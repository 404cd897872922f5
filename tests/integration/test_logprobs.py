"""Logprobs from the engine: sampled tokens' and the prompt's, equal to transformers' log-softmax."""

from __future__ import annotations

import pytest
import torch

from kvcache import SamplingParams
from kvcache.errors import KVCacheError

PROMPT = [3, 17, 42, 99, 7, 12, 64, 5, 33, 21, 8, 90, 14, 2, 77, 41, 9, 60]  # 18 tokens: crosses a block


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of transformers' logits at every position."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampled_tokens_logprobs_are_the_raw_models(tiny_llm, hf_tiny, temperature):
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=1, ignore_eos=True, logprobs=3)
    out = tiny_llm.generate([PROMPT], params)[0]
    assert [e.token_id for e in out.logprobs] == out.token_ids
    ref = hf_logprobs(hf_tiny, PROMPT + out.token_ids)
    for i, (entry, token) in enumerate(zip(out.logprobs, out.token_ids)):
        row = ref[len(PROMPT) - 1 + i]  # the position that predicted this token
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        want = torch.topk(row, 3)
        assert [t for t, _ in entry.top] == want.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(want.values.tolist(), abs=1e-4)
        if temperature == 0.0:
            assert entry.top[0][0] == token


def test_prompt_logprobs_first_is_none(tiny_llm, hf_tiny):
    out = tiny_llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))[0]
    assert out.logprobs is None and len(out.prompt_logprobs) == len(PROMPT)
    assert out.prompt_logprobs[0] is None
    ref = hf_logprobs(hf_tiny, PROMPT)
    for t in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[t]
        assert entry.token_id == PROMPT[t]
        assert entry.logprob == pytest.approx(float(ref[t - 1, PROMPT[t]]), abs=1e-4)
        assert [i for i, _ in entry.top] == torch.topk(ref[t - 1], 2).indices.tolist()


def test_no_logprobs_unless_asked(tiny_llm):
    out = tiny_llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert out.logprobs is None and out.prompt_logprobs is None
    zero = tiny_llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0, logprobs=0))[0]
    assert len(zero.logprobs) == 2 and all(e.top == [] for e in zero.logprobs)


@pytest.mark.parametrize("kwargs", [{"logprobs": 21}, {"logprobs": -1}, {"prompt_logprobs": True}])
def test_bad_logprobs_are_one_sentence(kwargs):
    with pytest.raises(KVCacheError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
