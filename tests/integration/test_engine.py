"""`LLMEngine` (continuous batching over the paged KV pool) on the tiny random-weight Llama.

Pools are sized in blocks of 4 tokens from `kv_bytes_per_token`, small enough (24 blocks =
96 token slots) that 16 concurrent requests force preemption. Greedy results must equal each
request run alone; they may differ only at a near-tie of `transformers`' logits.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import kvcache
from kvcache import SamplingParams
from kvcache.cache.attention import TORCH
from kvcache.cache.spec import KVFormat, ModelShape, kv_bytes_per_token
from tests.helpers import assert_same_tokens, recompute_greedy

BS = 4
NUM_BLOCKS = 24  # 96 token slots


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


@pytest.fixture(scope="module")
def bpt(tiny_llm) -> int:
    return tiny_llm.kv_bytes_per_token


@pytest.fixture(scope="module")
def ref_llm(tiny_model_dir):
    """Reference runs, one request at a time (default, big pool; prefix caching off)."""
    return kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False,
                       enable_prefix_caching=False)


def make_llm(tiny_model_dir, bpt: int, num_blocks: int = NUM_BLOCKS, **kw) -> kvcache.LLM:
    return kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False,
                       kv_cache_memory=num_blocks * BS * bpt, block_size=BS, **kw)


def hf_last_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def check_same(request, prompt: list[int], ours: list[int], ref: list[int]) -> None:
    """ours == ref, or a first divergence at a near-tie (transformers is loaded only if needed)."""
    if ours != ref:
        hf = request.getfixturevalue("hf_tiny")
        assert_same_tokens(lambda ids: hf_last_logits(hf, ids), prompt, ours, ref)


def check_pool_empty(llm: kvcache.LLM) -> None:
    s = llm.stats()
    assert s["blocks_used"] == 0, s
    assert s["blocks_used"] + s["blocks_free"] == s["blocks_total"]
    assert s["blocks_cached"] <= s["blocks_free"]
    assert s["running"] == 0 and s["waiting"] == 0
    eng = llm.engine
    assert eng.kv.num_seqs == 0 and not eng.requests
    eng.kv.pool.check_invariants()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def workload(kind: str, vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """16 greedy requests: 'mixed' prompts of 3-40 random ids, or 'shared' ones that start
    with the same 14 ids (3 full blocks + 2); max_tokens 5-30."""
    rng = random.Random(2024)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731  (0-2 are special tokens)
    if kind == "mixed":
        lengths = [3, 40] + [rng.randint(3, 40) for _ in range(14)]
        prompts = [ids(n) for n in lengths]
    else:
        prefix = ids(14)
        prompts = [prefix + ids(rng.randint(1, 20)) for _ in range(16)]
    params = [greedy(n) for n in [5, 30] + [rng.randint(5, 30) for _ in range(14)]]
    return prompts, params


_REF_CACHE: dict[tuple, list[int]] = {}


def reference(ref_llm, prompt: list[int], params: SamplingParams, use_cache: bool = False) -> list[int]:
    """The request's tokens run alone (memoized): on the engine, or with no KV cache at all
    (every step a forward pass over the whole sequence, no engine)."""
    key = (tuple(prompt), repr(params), use_cache)
    if key not in _REF_CACHE:
        if use_cache:
            _REF_CACHE[key] = ref_llm.generate([prompt], params)[0].token_ids
        else:
            assert params.greedy and params.ignore_eos
            _REF_CACHE[key] = recompute_greedy(ref_llm.model, prompt, params.max_tokens)
    return _REF_CACHE[key]


# ----------------------------------------------------------------------------- continuous batching


@pytest.mark.parametrize(
    "kind,prefix,budget",
    [("mixed", True, 512), ("mixed", False, 512), ("mixed", True, 16), ("shared", True, 512),
     ("shared", False, 512), ("shared", True, 16)],
    ids=["mixed-prefix", "mixed-noprefix", "mixed-prefix-chunked16", "shared-prefix", "shared-noprefix",
         "shared-prefix-chunked16"],
)
def test_concurrent_requests_equal_each_alone(request, tiny_model_dir, bpt, ref_llm, kind, prefix, budget):
    llm = make_llm(tiny_model_dir, bpt, enable_prefix_caching=prefix, max_num_batched_tokens=budget)
    prompts, params = workload(kind, llm.config.vocab_size)
    outs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["preemptions"] > 0, "the pool is meant to be too small for all 16 at once"
    assert any(o.metrics.preemptions > 0 for o in outs)
    assert sum(o.metrics.preemptions for o in outs) == stats["preemptions"]
    for prompt, p, out in zip(prompts, params, outs):
        assert out.error is None and out.finish_reason == "length"
        assert out.prompt_token_ids == prompt and len(out.token_ids) == p.max_tokens
        check_same(request, prompt, out.token_ids, reference(ref_llm, prompt, p))
    if prefix and kind == "shared":
        assert stats["prefix_hits"] > 0 and stats["prefix_hit_rate"] > 0
        assert any(o.metrics.cached_prompt_tokens > 0 for o in outs)
        assert all(o.metrics.cached_prompt_tokens % BS == 0 for o in outs)
        assert all(o.metrics.cached_prompt_tokens <= 12 for o in outs)  # the 14-id prefix holds 3 full blocks
    if not prefix:
        assert stats["prefix_hits"] == 0 and stats["blocks_cached"] == 0
        assert all(o.metrics.cached_prompt_tokens == 0 for o in outs)
    check_pool_empty(llm)


def test_mixed_steps_run_in_one_forward_and_equal_separate_passes(request, tiny_model_dir, bpt, ref_llm):
    """Decode rows and prompt chunks of a step share one forward pass (`cache.mixed_step`);
    the tokens equal those of separate passes, with preemption and chunked prompts."""
    prompts, params = workload("mixed", ref_llm.config.vocab_size)
    tokens, passes = {}, {}
    for mixed in (True, False, "torch"):  # "torch": mixed, with no native kernels (as on CUDA)
        llm = make_llm(tiny_model_dir, bpt, max_num_batched_tokens=16)
        eng = llm.engine
        eng.runner.mixed_steps = bool(mixed)
        native_before = eng.model.native
        eng.model.native = mixed != "torch"
        if mixed == "torch":  # the backend is chosen when the engine is built: swap in torch's
            eng.storage.attention = TORCH
        calls = []
        forward, step = eng.model.forward, eng.step

        def counted_forward(*a, **kw):
            calls[-1][1] += 1
            return forward(*a, **kw)

        def counted_step():
            calls.append([None, 0])
            outs = step()
            chunks = eng.last_schedule.chunks
            calls[-1][0] = (any(c.num_tokens == 1 for c in chunks), sum(c.num_tokens > 1 for c in chunks))
            return outs

        eng.model.forward, eng.step = counted_forward, counted_step
        outs = llm.generate(prompts, params)
        assert llm.stats()["preemptions"] > 0
        tokens[mixed] = [o.token_ids for o in outs]
        passes[mixed] = [(kind, n) for kind, n in calls if kind is not None and kind[1] > 0]
        eng.model.forward, eng.model.native = forward, native_before
        check_pool_empty(llm)
    assert passes[True] and all(n == 1 for _, n in passes[True])  # every step with a prompt chunk: one pass
    both = [n for (has_decode, _), n in passes[False] if has_decode]
    assert both and all(n >= 2 for n in both)  # separately: the decode batch, then each chunk
    assert passes["torch"] and all(n == 1 for _, n in passes["torch"])
    for prompt, a, b, c in zip(prompts, tokens[True], tokens[False], tokens["torch"]):
        check_same(request, prompt, a, b)
        check_same(request, prompt, c, b)


def test_engine_reference_agrees_with_uncached(request, ref_llm, tiny_llm):
    """The references above (recomputed without a cache) match the paged engine run alone."""
    prompts, params = workload("mixed", tiny_llm.config.vocab_size)
    for prompt, p in list(zip(prompts, params))[:4]:
        paged = reference(ref_llm, prompt, p, use_cache=True)
        check_same(request, prompt, paged, reference(ref_llm, prompt, p))


def test_thousand_short_requests_leak_no_blocks(tiny_model_dir, bpt):
    llm = make_llm(tiny_model_dir, bpt, max_num_batched_tokens=64)
    vocab = llm.config.vocab_size
    rng = random.Random(5)
    common = [[rng.randrange(3, vocab) for _ in range(rng.randint(4, 10))] for _ in range(5)]
    done = 0
    for _ in range(20):
        prompts, params = [], []
        for _ in range(50):
            if rng.random() < 0.4:
                prompt = list(rng.choice(common))  # repeats: prefix hits, shared blocks
            else:
                prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 10))]
            prompts.append(prompt)
            if rng.random() < 0.3:
                params.append(SamplingParams(max_tokens=rng.randint(1, 6), temperature=1.0, seed=rng.randint(0, 99)))
            else:
                params.append(SamplingParams(max_tokens=rng.randint(1, 6), temperature=0.0,
                                             ignore_eos=rng.random() < 0.5))
        outs = llm.generate(prompts, params)
        for p, o in zip(params, outs):
            assert o.error is None and 1 <= len(o.token_ids) <= p.max_tokens
            assert o.finish_reason in ("stop", "length")
            assert o.finish_reason == "stop" or len(o.token_ids) == p.max_tokens
        done += len(outs)
        check_pool_empty(llm)
    assert done == 1000
    s = llm.stats()
    assert s["prefix_hits"] > 0 and s["blocks_cached"] > 0 and s["preemptions"] > 0


# ----------------------------------------------------------------------------- failures, abort


def test_request_longer_than_pool_fails_alone(request, tiny_model_dir, bpt, ref_llm):
    llm = make_llm(tiny_model_dir, bpt)
    vocab = llm.config.vocab_size
    rng = random.Random(11)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (7, 100, 20, 5)]  # 100 > 96 slots
    params = [greedy(n) for n in (12, 5, 20, 8)]
    outs = llm.generate(prompts, params)
    bad = outs[1]
    assert bad.finish_reason == "error" and bad.token_ids == [] and bad.text == ""
    assert bad.error and "96" in bad.error and "pool" in bad.error
    for i in (0, 2, 3):
        o = outs[i]
        assert o.error is None and o.finish_reason == "length" and len(o.token_ids) == params[i].max_tokens
        check_same(request, prompts[i], o.token_ids, reference(ref_llm, prompts[i], params[i]))
    check_pool_empty(llm)


def test_request_outgrowing_pool_fails_alone(tiny_model_dir, bpt):
    llm = make_llm(tiny_model_dir, bpt)
    vocab = llm.config.vocab_size
    rng = random.Random(12)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (80, 6)]
    params = [greedy(30), greedy(10)]  # 80 + 30 > 96 slots
    outs = llm.generate(prompts, params)
    assert outs[0].finish_reason == "error" and outs[0].error
    assert outs[1].error is None and len(outs[1].token_ids) == 10
    check_pool_empty(llm)


def test_stream_closed_early_frees_its_blocks(tiny_model_dir, bpt):
    llm = make_llm(tiny_model_dir, bpt)
    gen = llm.stream("Once upon a time there was a little robot", greedy(40))
    pieces = [next(gen) for _ in range(3)]
    assert all(pieces)
    s = llm.stats()
    assert s["blocks_used"] > 0 and s["running"] == 1
    gen.close()
    check_pool_empty(llm)
    # the engine is still usable and deterministic afterwards
    full = "".join(llm.stream("Once upon a time there was a little robot", greedy(40)))
    assert full.startswith("".join(pieces))
    check_pool_empty(llm)


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_equals_alone(tiny_model_dir, bpt, ref_llm):
    llm = make_llm(tiny_model_dir, bpt)
    prompts, greedy_params = workload("mixed", llm.config.vocab_size)
    params = [SamplingParams(max_tokens=p.max_tokens, temperature=1.0, top_p=0.9, seed=100 + i, ignore_eos=True)
              if i % 3 == 0 else p for i, p in enumerate(greedy_params)]
    first = llm.generate(prompts, params)
    assert llm.stats()["preemptions"] > 0  # seeded rows are recomputed too
    second = llm.generate(prompts, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    seeded = [i for i, p in enumerate(params) if p.seed is not None]
    for i in seeded:
        alone = ref_llm.generate([prompts[i]], params[i])[0].token_ids
        assert first[i].token_ids == alone, i
    # the seed matters and sampling is not greedy
    i = seeded[0]
    other = SamplingParams(max_tokens=params[i].max_tokens, temperature=1.0, top_p=0.9, seed=99_999, ignore_eos=True)
    assert llm.generate([prompts[i]], other)[0].token_ids != first[i].token_ids
    assert reference(ref_llm, prompts[i], greedy_params[i]) != first[i].token_ids
    check_pool_empty(llm)


# ----------------------------------------------------------------------------- stats, memory


def test_stats_keys(tiny_model_dir, bpt):
    llm = make_llm(tiny_model_dir, bpt)
    s = llm.stats()
    for key in ("blocks_total", "blocks_used", "blocks_cached", "blocks_free", "prefix_hit_rate", "running",
                "waiting", "preemptions"):
        assert key in s
    assert s["blocks_total"] == NUM_BLOCKS and s["blocks_free"] == NUM_BLOCKS
    assert s["blocks_used"] == s["blocks_cached"] == s["running"] == s["waiting"] == s["preemptions"] == 0
    assert s["prefix_hit_rate"] == 0.0


@pytest.mark.parametrize("dtype,fmt", [("float32", "fp32"), ("bfloat16", "bf16")])
def test_paged_storage_bytes_match_spec(tiny_model_dir, dtype, fmt):
    shape = ModelShape.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()))
    per_token = kv_bytes_per_token(shape, KVFormat.parse(fmt))
    llm = kvcache.LLM(str(tiny_model_dir), dtype=dtype, device="cpu", progress=False,
                      kv_cache_memory=NUM_BLOCKS * BS * per_token + BS * per_token - 1, block_size=BS)
    assert llm.kv_bytes_per_token == per_token
    storage = llm.engine.storage
    assert storage.num_blocks == NUM_BLOCKS  # whole blocks only: the budget's remainder is dropped
    assert storage.nbytes == NUM_BLOCKS * BS * per_token
    assert llm.stats()["kv_bytes_total"] == storage.nbytes
    # the tensors hold exactly that, plus one null block (padding target of gathers)
    tensor_bytes = sum(t.numel() * t.element_size() for t in (storage.k, storage.v))
    assert tensor_bytes == storage.nbytes + BS * per_token
    out = llm.generate([[5, 6, 7, 8, 9, 10]], greedy(2))[0]
    assert out.metrics.kv_cache_bytes == 2 * BS * per_token  # 6 + 2 - 1 = 7 tokens held in 2 whole blocks


def test_never_written_slots_cannot_leak_into_attention(tiny_model_dir, tiny_llm):
    """Gathers read whole blocks, past each sequence's end; fresh memory may hold NaN/inf.
    Poison every block slot of a fresh pool: outputs must still equal the uncached path."""
    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False,
                      kv_cache_memory=64 * 4 * tiny_llm.kv_bytes_per_token, block_size=4)
    st = llm.engine.storage
    end = st.num_blocks * st.block_size
    st.k[:, :, :end] = float("nan")
    st.v[:, :, :end] = float("inf")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    got = llm.generate(prompts, params)
    for p, g in zip(prompts, got):
        assert g.token_ids == recompute_greedy(llm.model, p, params.max_tokens)
