"""SamplingParams validation and the per-request Sampler."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from kvcache.engine.sampling import Sampler, SamplingParams
from kvcache.errors import KVCacheError

V = 50


def rand_logits(seed: int, n: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=1.5), dict(max_tokens=True), dict(max_tokens="8"),
    dict(temperature=-1), dict(temperature=-1e-9), dict(temperature=math.nan),
    dict(top_k=-1), dict(top_k=2.5),
    dict(top_p=0), dict(top_p=-0.1), dict(top_p=1.01), dict(top_p=math.nan),
    dict(repetition_penalty=0), dict(repetition_penalty=-1.2), dict(repetition_penalty=math.nan),
], ids=repr)
def test_invalid_params_raise(kwargs):
    with pytest.raises(KVCacheError) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value)  # a readable message


@pytest.mark.parametrize("kwargs", [
    dict(), dict(max_tokens=1), dict(temperature=0.0), dict(temperature=7.5), dict(top_k=0), dict(top_k=1),
    dict(top_p=1.0), dict(top_p=1e-9), dict(repetition_penalty=0.5), dict(seed=0),
], ids=repr)
def test_valid_params_accepted(kwargs):
    SamplingParams(**kwargs)


def test_stop_normalised_to_list_without_empty_strings():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=["a", "", "b"]).stop == ["a", "b"]
    assert SamplingParams(stop="").stop == []
    assert SamplingParams().stop == []


def test_greedy_flag():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.01).greedy


# ----------------------------------------------------------------------------- Sampler


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = rand_logits(seed)
    s = Sampler(SamplingParams(temperature=0.0))
    assert s.generator is None  # greedy needs no randomness
    assert s(logits) == int(logits.argmax())


@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0, 1000.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature):
    for seed in range(5):
        logits = rand_logits(seed)
        s = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=seed))
        assert {s(logits) for _ in range(20)} == {int(logits.argmax())}


def test_tiny_top_p_keeps_only_the_top_token():
    for seed in range(5):
        logits = rand_logits(seed, scale=0.1)  # nearly flat: without top_p anything goes
        s = Sampler(SamplingParams(temperature=5.0, top_p=1e-6, seed=seed))
        assert {s(logits) for _ in range(20)} == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=0))
    seen = Counter(s(probs.log()) for _ in range(400))
    assert set(seen) == {1, 3}  # 0.4 + 0.3 reaches 0.6; 0.4 alone does not


def test_top_k_keeps_only_k_best():
    logits = rand_logits(11, scale=0.2)
    best3 = set(logits.topk(3).indices.tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=0))
    assert set(s(logits) for _ in range(300)) == best3


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    s = Sampler(SamplingParams(temperature=1.0, seed=123))
    n = 4000
    counts = Counter(s(probs.log()) for _ in range(n))
    for i, p in enumerate(probs.tolist()):
        assert abs(counts[i] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_low_temperature_sharpens():
    probs = torch.tensor([0.4, 0.35, 0.25])
    cold = Sampler(SamplingParams(temperature=0.05, seed=1))
    assert Counter(cold(probs.log()) for _ in range(200))[0] > 190


def test_repetition_penalty_lowers_seen_positive_logit():
    logits = torch.tensor([0.5, 2.0, 1.5, -1.0])
    before = logits.clone()
    s = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert s(logits) == 1
    assert s(logits, seen=torch.tensor([1])) == 2  # 2.0 / 2 = 1.0 < 1.5
    assert s(logits, seen=torch.tensor([1, 1, 1])) == 2  # repeats are not penalised twice over
    assert torch.equal(logits, before)  # the caller's logits are untouched
    assert s(logits, seen=torch.tensor([], dtype=torch.long)) == 1


def test_repetition_penalty_pushes_negative_logits_further_down():
    logits = torch.tensor([-1.0, -1.5, -3.0])
    s = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert s(logits, seen=torch.tensor([0])) == 1  # -1 * 2 = -2 < -1.5


def test_repetition_penalty_below_one_favours_seen_tokens():
    logits = torch.tensor([1.0, 1.5])
    s = Sampler(SamplingParams(temperature=0.0, repetition_penalty=0.5))
    assert s(logits, seen=torch.tensor([0])) == 0  # 1.0 / 0.5 = 2.0 > 1.5


def test_seeded_sampler_is_reproducible():
    logits = rand_logits(3, scale=0.5)
    draws = [[Sampler(SamplingParams(temperature=1.0, seed=seed)) for _ in range(2)] for seed in (7, 8)]
    seqs = [[[s(logits) for _ in range(50)] for s in pair] for pair in draws]
    assert seqs[0][0] == seqs[0][1]
    assert seqs[1][0] == seqs[1][1]
    assert seqs[0][0] != seqs[1][0]  # 50 draws over a near-flat 50-way distribution
    assert len(set(seqs[0][0])) > 5


def test_unseeded_samplers_differ():
    logits = rand_logits(4, scale=0.1)
    a = Sampler(SamplingParams(temperature=1.0))
    b = Sampler(SamplingParams(temperature=1.0))
    assert [a(logits) for _ in range(40)] != [b(logits) for _ in range(40)]


def test_sampler_accepts_low_precision_logits():
    logits = rand_logits(5).to(torch.bfloat16)
    assert Sampler(SamplingParams(temperature=0.0))(logits) == int(logits.float().argmax())
    assert 0 <= Sampler(SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=1))(logits) < V
