"""Checks on the real default model (SmolLM2-135M-Instruct, dequantized from the shipped GGUF)."""

from __future__ import annotations

import json

import pytest
import torch

from kvcache import LLM, SamplingParams
from kvcache.cache.dense import KVCache
from kvcache.cache.spec import KVFormat, ModelShape, kv_bytes
from kvcache.models.loader import DEFAULT_MODEL, load_model, packaged_gguf
from kvcache.models.step import StepInputs, causal_mask
from tests.helpers import assert_same_tokens, policy_cache_greedy

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(2)
    return LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False)


@pytest.fixture(scope="module")
def hf_model(llm):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llm.model_dir), dtype=torch.float32).eval()


def assert_same_or_near_tie(llm, prompt_ids, got, want):
    """Token lists must match; a divergence is allowed only at a near-tie of our fp32 logits."""

    def last_logits(ids):
        x = torch.tensor([ids])
        with torch.inference_mode():
            return llm.model.forward(StepInputs(x, None, 0, causal_mask(None, 1, 0, x.shape[1], "cpu")), None)[0]

    assert_same_tokens(last_logits, prompt_ids, got, want)


def test_logits_match_transformers(llm, hf_model):
    messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    ids = torch.tensor([llm.chat_ids(messages)])
    with torch.inference_mode():
        ref = hf_model(ids).logits[0]
        ours = llm.model.forward(StepInputs(ids, None, 0, causal_mask(None, 1, 0, ids.shape[1], "cpu"), "all"), None)[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


def test_decode_step_logits_match_transformers(llm, hf_model):
    """A cached single-token step (native kernels where built) against transformers' full forward."""
    ids = torch.tensor([llm.chat_ids([{"role": "user", "content": "Name a large animal."}])])
    with torch.inference_mode():
        ref = hf_model(ids).logits[0, -3:]  # (3, V)
        cache = KVCache.for_model(llm.model, 1, ids.shape[1])
        llm.model.forward(StepInputs(ids[:, :-3], None, 0, None), cache)
        steps = [llm.model.forward(StepInputs(ids[:, i : i + 1], None, cache.length, None), cache)[0]
                 for i in range(ids.shape[1] - 3, ids.shape[1])]
    assert (torch.stack(steps) - ref).abs().max().item() < 1e-4


def test_our_gguf_dequantization_matches_transformers():
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    gguf = packaged_gguf(DEFAULT_MODEL)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref_sd = ref.state_dict()
    ours = load_model(DEFAULT_MODEL, progress=False).state_dict
    assert set(ours) <= set(ref_sd) and len(ours) >= len(ref_sd) - 1  # lm_head is tied
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref_sd[name]), name


def test_cached_and_uncached_greedy_agree(llm):
    prompt = llm.chat_ids([{"role": "user", "content": "Name three colours."}])
    cached = llm.generate([prompt], GREEDY)[0].token_ids
    uncached = llm.generate([prompt], GREEDY, use_cache=False)[0].token_ids
    assert len(cached) == GREEDY.max_tokens
    assert_same_or_near_tie(llm, prompt, uncached, cached)


def test_ragged_batch_equals_each_prompt_alone(llm):
    prompts = ["The capital of France is", "Write a short poem about the sea and the wind at night.",
               "1, 2, 3, 4,"]
    together = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, together):
        alone = llm.generate([prompt], GREEDY)[0]
        assert out.prompt_token_ids == alone.prompt_token_ids
        assert_same_or_near_tie(llm, alone.prompt_token_ids, out.token_ids, alone.token_ids)


def test_chat_session_reuses_cache_and_equals_recompute(llm):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    session = llm.session(system="You are a concise assistant.")
    history = [{"role": "system", "content": "You are a concise assistant."}]
    for turn, text in enumerate(["Hi! My name is Ada.", "What is my name?", "Give me one fun fact."]):
        out = session.send(text, params)
        history.append({"role": "user", "content": text})
        ref = llm.chat(history, params)
        assert_same_or_near_tie(llm, llm.chat_ids(history), out.token_ids, ref.token_ids)
        assert out.metrics.prompt_tokens == ref.metrics.prompt_tokens
        if turn:
            # everything before this turn's new message came from the cache
            assert out.metrics.cached_prompt_tokens > out.metrics.prompt_tokens // 2
        history.append({"role": "assistant", "content": out.text})


def test_engine_cache_bytes_equal_calculator(llm):
    shape = ModelShape.from_hf_config(json.loads((llm.model_dir / "config.json").read_text()))
    prompts = ["Hello there", "A somewhat longer prompt to make the batch ragged"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    for out in outs:
        held_tokens = out.metrics.prompt_tokens + out.metrics.generated_tokens - 1  # last token never fed
        slots = -(-held_tokens // 16) * 16  # whole 16-token blocks, the last one partly filled
        assert out.metrics.kv_cache_bytes == kv_bytes(shape, KVFormat.parse("fp32"), slots)
    assert kv_bytes(shape, KVFormat.parse("fp16"), 1) == 23_040


def _mixed_requests(llm, n=32, seed=0):
    """n prompts of mixed lengths (real text at different offsets) with mixed max_tokens."""
    import random

    import pydoc_data.topics as topics

    rng = random.Random(seed)
    text_ids = llm.tokenizer(" ".join(topics.topics[k] for k in sorted(topics.topics)[:10]))["input_ids"]
    prompts, params = [], []
    for _ in range(n):
        length, start = rng.randint(4, 60), rng.randint(0, 2000)
        prompts.append(text_ids[start : start + length])
        params.append(SamplingParams(max_tokens=rng.randint(4, 20), temperature=0.0, ignore_eos=True))
    return prompts, params


@pytest.fixture(scope="module")
def mixed_alone(llm):
    """The 32 mixed requests and each one's greedy tokens when run alone."""
    prompts, params = _mixed_requests(llm)
    return prompts, params, [llm.generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_32_requests_with_preemption_equal_each_alone(llm, mixed_alone, prefix_caching):
    prompts, params, alone = mixed_alone
    small = LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False, block_size=16, enable_prefix_caching=prefix_caching,
                kv_cache_memory=24 * 16 * llm.kv_bytes_per_token)  # 24 blocks: far less than 32 requests need
    together = small.generate(prompts, params)
    stats = small.stats()
    assert stats["preemptions"] > 0
    for p, out, ref in zip(prompts, together, alone):
        assert out.error is None
        assert_same_or_near_tie(llm, p, out.token_ids, ref)
    assert stats["blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["blocks_free"] == stats["blocks_total"]


INT8_PAGED = "quantized:bits=8,key_axis=token,residual=0"
# Near-tie bound for int8 caches: a different fp32 summation order upstream (the skinny
# matmul of a decode row against F.linear of a batch) flips some rounded codes, and the logits
# move by up to ~0.02 where the full cache moves them by ~1e-5 (measured on four of these
# requests on an AVX2 CPU); 0.065 was seen on one. A wrong block or scale moves them by whole units.
INT8_NEAR_TIE = 0.1


def test_int8_paged_engine_with_preemption_equals_policy_cache_alone(llm, mixed_alone):
    """16 mixed requests on int8 blocks (a pool far too small, prefix caching on) give each
    request's tokens run alone on a one-sequence SequenceCache under the same policy; the int8
    pool holds 3.8x the tokens of the fp32 one in the same bytes."""
    from kvcache.cache.policies.cache import SequenceCache

    prompts, params, fp32_alone = (x[:16] for x in mixed_alone)
    probe = LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False, kv_policy=INT8_PAGED, kv_cache_memory="16MiB")
    bpt = probe.engine_bytes_per_token
    assert llm.kv_bytes_per_token / bpt > 3.7
    small = LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False, kv_policy=INT8_PAGED, block_size=16,
                kv_cache_memory=12 * 16 * bpt)
    together = small.generate(prompts, params)
    assert small.stats()["preemptions"] > 0
    model = llm.model

    def policy_logits(ids):
        cache = SequenceCache(model, INT8_PAGED)
        x = torch.tensor([ids])
        with torch.inference_mode():
            return model.forward(StepInputs(x, None, 0, None), cache)[0]

    same_as_fp32 = 0
    for p, sp, out, ref32 in zip(prompts, params, together, fp32_alone):
        alone = policy_cache_greedy(model, INT8_PAGED, p, sp.max_tokens)  # greedy, ignore_eos
        assert_same_tokens(policy_logits, p, out.token_ids, alone, tol=INT8_NEAR_TIE)
        same_as_fp32 += out.token_ids == ref32
    assert same_as_fp32 >= 12, f"int8 changed {16 - same_as_fp32} of 16 greedy continuations"
    assert small.stats()["blocks_used"] == 0


SINKS = "sinks:n_sink=4,window=60"


def topic_ids(llm, lo: int, hi: int) -> list[int]:
    """Token ids of Python's pydoc topics lo..hi-1 (in sorted order), joined: public real text."""
    import pydoc_data.topics as topics

    return llm.tokenizer(" ".join(topics.topics[k] for k in sorted(topics.topics)[lo:hi]))["input_ids"]


def assert_each_equals_alone(policy: str, prompts, params, outputs) -> None:
    """Each output came without error and equals its prompt generated alone under `policy`."""
    alone_llm = LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False, kv_policy=policy, kv_cache_memory="64MiB")
    for p, sp, out in zip(prompts, params, outputs):
        assert out.error is None
        assert out.token_ids == alone_llm.generate([p], sp)[0].token_ids


def test_sinks_paged_engine_with_preemption_equals_alone_and_the_policy_cache(llm):
    """12 requests whose prompts pass the window, on sinks blocks (a small pool, prefix caching
    on, prompts chunked): each equals its run alone, and two equal the per-sequence SequenceCache
    fed a token at a time."""
    import random

    rng = random.Random(3)
    ids = topic_ids(llm, 10, 20)
    shared = ids[:40]
    prompts = [(shared if i % 3 == 0 else []) + ids[500 + 150 * i : 500 + 150 * i + rng.randint(30, 140)]
               for i in range(12)]
    params = [SamplingParams(max_tokens=rng.randint(10, 40), temperature=0.0, ignore_eos=True) for _ in prompts]
    small = LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False, kv_policy=SINKS, block_size=16,
                kv_cache_memory=20 * 16 * llm.kv_bytes_per_token, max_num_batched_tokens=64)
    together = small.generate(prompts, params)
    stats = small.stats()
    assert stats["preemptions"] > 0 and stats["prefix_hits"] > 0 and stats["blocks_used"] == 0
    assert_each_equals_alone(SINKS, prompts, params, together)
    for p, sp, out in list(zip(prompts, params, together))[:2]:
        assert out.token_ids == policy_cache_greedy(llm.model, SINKS, p, sp.max_tokens, token_at_a_time=True)


def test_snapkv_paged_engine_with_preemption_equals_alone_and_the_policy_cache(llm):
    """8 requests on snapkv-compressed blocks (half of each prompt evicted after its prefill;
    a small pool, prefix caching on, prompts chunked): each equals its run alone, and two equal
    the per-sequence SequenceCache that sees the whole prompt in one chunk."""
    import random

    policy = "evict:scorer=snapkv,ratio=0.5,window=16"
    rng = random.Random(4)
    ids = topic_ids(llm, 20, 30)
    prompts = [ids[: 48] + ids[300 + 120 * i : 300 + 120 * i + rng.randint(20, 100)] for i in range(8)]
    params = [SamplingParams(max_tokens=rng.randint(8, 24), temperature=0.0, ignore_eos=True) for _ in prompts]
    small = LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False, kv_policy=policy, block_size=16,
                kv_cache_memory=14 * 16 * llm.kv_bytes_per_token, max_num_batched_tokens=48)
    together = small.generate(prompts, params)
    stats = small.stats()
    assert stats["preemptions"] > 0 and stats["prefix_hits"] > 0 and stats["blocks_used"] == 0
    assert stats["tokens_evicted"] >= sum(len(p) // 2 for p in prompts)
    assert_each_equals_alone(policy, prompts, params, together)
    for p, sp, out in list(zip(prompts, params, together))[:2]:
        assert out.token_ids == policy_cache_greedy(llm.model, policy, p, sp.max_tokens, token_at_a_time=False)


@pytest.mark.parametrize("policy", ["quantized:bits=2,group_size=32,residual=64,n_sink=4",
                                    "tiered:hot=64,warm_bits=4,warm=128,cold=disk,group_size=32"])
def test_per_request_policy_caches_with_preemption_equal_the_policy_cache_alone(llm, policy):
    """KIVI int2 (per-channel keys, exact residual and sinks) and tiered (hot / warm / cold on
    disk), which paged blocks cannot hold, on the engine's per-request caches: 8 requests in a
    pool small enough to preempt, prompts in 32-token pieces; each equals a SequenceCache fed
    the same pieces alone, and no cache held more than the blocks granted to it."""
    import random

    from kvcache.cache.policies.grammar import parse_policy
    from kvcache.cache.row_policy import policy_footprint

    rng = random.Random(5)
    ids = topic_ids(llm, 30, 40)
    prompts = [ids[150 * i : 150 * i + rng.randint(40, 260)] for i in range(8)]
    params = [SamplingParams(max_tokens=rng.randint(8, 40), temperature=0.0, ignore_eos=True) for _ in prompts]
    fp = policy_footprint(parse_policy(policy), llm.config, torch.float32, 32)
    tokens = 3 * fp.slots(150)  # about three requests at once
    small = LLM(DEFAULT_MODEL, dtype="float32", quantization="none", progress=False, kv_policy=policy, block_size=16,
                kv_cache_memory=tokens * fp.rate, max_num_batched_tokens=64)
    engine, worst = small.engine, []

    def watch(_):
        for rid in engine.runner.caches:
            worst.append(engine.runner.bytes_held(rid) / (len(engine.kv.block_table(rid)) * 16 * fp.rate))

    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.run_to_completion(requests, on_step=watch)
    assert engine.scheduler.num_preemptions > 0 and small.stats()["blocks_used"] == 0
    assert 0 < max(worst) <= 1.0
    for p, sp, r in zip(prompts, params, requests):
        assert r.error is None
        assert r.output_token_ids == policy_cache_greedy(llm.model, policy, p, sp.max_tokens, piece=32)


def test_bf16_engine_steps_through_native_kernels_track_fp32(llm):
    """A bf16 engine step (one forward pass for a decode row and a prompt chunk; native norms,
    RoPE, SwiGLU and causal prefill attention) gives logits close to the fp32 model's."""
    from kvcache.native import ops as native

    bf = LLM(DEFAULT_MODEL, dtype="bfloat16", quantization="none", progress=False, kv_cache_memory="32MiB")
    prompts = [topic_ids(llm, 0, 3)[:40], topic_ids(llm, 3, 6)[:300]]
    calls, captured = [], []
    kernel, forward = native.prefill_attention, bf.engine.model.forward

    def counting_kernel(*a):
        calls.append(a[0].shape[2])
        return kernel(*a)

    def capturing_forward(step, cache):
        logits = forward(step, cache)
        captured.append((step, logits.float()))
        return logits

    native.prefill_attention, bf.engine.model.forward = counting_kernel, capturing_forward
    try:
        eng = bf.engine
        eng.add_request(prompts[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        eng.step()  # the short prompt alone
        eng.add_request(prompts[1], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        eng.step()  # its first decode row and the long prompt, in one pass
    finally:
        native.prefill_attention = kernel
    # each prompt chunk through the native kernel, once per layer (an AVX-512 build; without
    # AVX-512 there is no prefill kernel and SDPA takes the chunks)
    assert calls == ([40] * 30 + [300] * 30 if native.prefill_attention_built() else [])
    step, logits = captured[-1]
    assert step.input_ids.shape == (1, 301) and logits.shape[0] == 2  # one row: decode token + chunk
    with torch.inference_mode():
        x = torch.tensor([prompts[1]])
        want = llm.model.forward(StepInputs(x, None, 0, causal_mask(None, 1, 0, x.shape[1], "cpu")), None)[0]
    got = logits[1]
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16: within 5% of the largest logit
    top2 = want.topk(2).values
    if top2[0] - top2[1] > 0.5:
        assert got.argmax() == want.argmax()
