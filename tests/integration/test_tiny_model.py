"""Our engine on a tiny random-weight Llama, checked against `transformers`' implementation.

Greedy token sequences may legitimately diverge only where two logits are (numerically)
tied; `assert_same_tokens` allows a divergence only there, so the checks can still fail.
"""

from __future__ import annotations

import json

import pytest
import torch

import kvcache
from kvcache import KVCacheError, SamplingParams
from kvcache.cache.dense import KVCache
from kvcache.cache.spec import KVFormat, ModelShape, kv_bytes, kv_bytes_per_token
from kvcache.errors import ModelNotFoundError, PromptTooLongError
from kvcache.models.llama import LlamaModel
from kvcache.models.loader import load_model
from kvcache.models.step import StepInputs, causal_mask
from tests.helpers import NEAR_TIE, dense_greedy, recompute_greedy
from tests.helpers import assert_same_tokens as shared_assert_same_tokens

ATOL = 1e-4
GREEDY20 = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
PROMPTS = [
    "Hello, how are you?",
    "The",
    "Once upon a time there was a little robot who loved to read",
    "What is the capital of France? Paris",
]


# ----------------------------------------------------------------------------- helpers


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """Reference logits (T, V) of `transformers` for one sequence."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """`transformers`' own greedy generation of exactly n tokens (EOS disabled)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_same_tokens(hf, prompt: list[int], ours: list[int], ref: list[int], tol: float = NEAR_TIE) -> None:
    """ours == ref, or a first divergence at a near-tie of `transformers`' logits."""
    shared_assert_same_tokens(lambda ids: hf_logits(hf, ids)[-1], prompt, ours, ref, tol)


def random_ids(n: int, vocab: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def full_logits(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    step = StepInputs(ids, None, 0, causal_mask(None, b, 0, t, model.device), logits_for="all")
    with torch.inference_mode():
        return model.forward(step, None).float()


def build_model(tiny_model_dir, variant: str) -> LlamaModel:
    """Our model from the folder's weights with the given matmul kernels ("torch" / "onednn" / "native")."""
    loaded = load_model(str(tiny_model_dir), progress=False)
    from kvcache.models.linear import onednn_available
    from kvcache.native import build

    if variant == "onednn" and not onednn_available(torch.float32, torch.device("cpu")):
        pytest.skip("oneDNN kernels are not available here")
    if variant == "native" and not build.wanted():  # with a compiler, a failed build fails here
        pytest.skip("no C compiler on this machine, or KVCACHE_NATIVE=0")
    return LlamaModel.from_state_dict(loaded.config, loaded.state_dict, torch.float32, "cpu", kernels=variant)


def load_shape(model_dir) -> ModelShape:
    return ModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


@pytest.fixture(scope="module")
def llm_bf16(tiny_model_dir):
    return kvcache.LLM(str(tiny_model_dir), dtype="bfloat16", device="cpu", progress=False)


@pytest.fixture(scope="module")
def llm16(tiny_model_dir):
    return kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=16, progress=False)


@pytest.fixture(scope="module")
def llm16_left(tiny_model_dir):
    return kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=16,
                       truncation="left", progress=False)


@pytest.fixture(scope="module")
def llm_short(tiny_model_dir):
    """Room for about two short chat turns."""
    return kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=100, progress=False)


# ----------------------------------------------------------------------------- forward pass


def test_tiny_model_shape(tiny_llm, tiny_model_dir):
    c = tiny_llm.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size) == (2, 4, 2, 16, 64)
    assert c.tie_word_embeddings and c.vocab_size == len(tiny_llm.tokenizer)
    assert tiny_llm.tokenizer.convert_tokens_to_ids("<|im_end|>") in tiny_llm.eos_ids


@pytest.mark.parametrize("variant", ["llm", "torch", "onednn", "native"])
def test_logits_match_transformers(tiny_llm, tiny_model_dir, hf_tiny, variant):
    """LLM's own model, and the model built with each kernel family (plain / oneDNN-packed / native)."""
    model = tiny_llm.model if variant == "llm" else build_model(tiny_model_dir, variant)
    ids = random_ids(24, tiny_llm.config.vocab_size, seed=1)
    ours = full_logits(model, ids)[0]
    ref = hf_logits(hf_tiny, ids[0].tolist())
    assert ours.shape == ref.shape == (24, tiny_llm.config.vocab_size)
    assert ref.std() > 0.5  # not a degenerate model
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_last_logits_and_batch_rows_match(tiny_llm, hf_tiny):
    ids = random_ids(11, tiny_llm.config.vocab_size, seed=2, batch=3)
    with torch.inference_mode():
        last = tiny_llm.model.forward(StepInputs(ids, None, 0, causal_mask(None, 3, 0, 11, "cpu")), None)
    assert last.shape == (3, tiny_llm.config.vocab_size)
    for b in range(3):
        torch.testing.assert_close(last[b], hf_logits(hf_tiny, ids[b].tolist())[-1], atol=ATOL, rtol=0)


def test_incremental_decode_matches_full_forward(tiny_llm, hf_tiny):
    model = tiny_llm.model
    ids = random_ids(20, tiny_llm.config.vocab_size, seed=3)
    full = full_logits(model, ids)[0]
    torch.testing.assert_close(full, hf_logits(hf_tiny, ids[0].tolist()), atol=ATOL, rtol=0)

    cache = KVCache.for_model(model, 1, 4)  # small on purpose: must grow while decoding
    got = []
    with torch.inference_mode():
        prefill = StepInputs(ids[:, :5], None, 0, causal_mask(None, 1, 0, 5, "cpu"), logits_for="all")
        got.append(model.forward(prefill, cache)[0])
        assert cache.length == 5
        # a chunk of 3 on top of the cache, then one token per step
        chunk = StepInputs(ids[:, 5:8], None, 5, causal_mask(None, 1, 5, 3, "cpu"), logits_for="all")
        got.append(model.forward(chunk, cache)[0])
        for i in range(8, 20):
            step = StepInputs(ids[:, i : i + 1], None, cache.length, causal_mask(None, 1, cache.length, 1, "cpu"))
            got.append(model.forward(step, cache))
            assert cache.length == i + 1
    assert cache.capacity >= 20
    torch.testing.assert_close(torch.cat(got).float(), full, atol=ATOL, rtol=0)


def test_left_padded_rows_match_unpadded(tiny_llm, hf_tiny):
    """Explicit positions + key mask make a left-padded row compute what it computes alone."""
    model, vocab = tiny_llm.model, tiny_llm.config.vocab_size
    long, short = random_ids(9, vocab, seed=4)[0].tolist(), random_ids(4, vocab, seed=5)[0].tolist()
    pad = 9 - 4
    ids = torch.tensor([long, [0] * pad + short])
    positions = torch.tensor([list(range(9)), [0] * pad + list(range(4))])
    key_valid = torch.tensor([[True] * 9, [False] * pad + [True] * 4])
    step = StepInputs(ids, positions, 0, causal_mask(key_valid, 2, 0, 9, "cpu"), logits_for="all")
    with torch.inference_mode():
        out = model.forward(step, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], hf_logits(hf_tiny, long), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, pad:], hf_logits(hf_tiny, short), atol=ATOL, rtol=0)


def test_attn_mask_none_means_causal_for_multi_token_steps(tiny_llm):
    ids = random_ids(6, tiny_llm.config.vocab_size, seed=6)
    with torch.inference_mode():
        implicit = tiny_llm.model.forward(StepInputs(ids, None, 0, None, logits_for="all"), None)
    torch.testing.assert_close(implicit, full_logits(tiny_llm.model, ids), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- greedy generation


def test_near_tie_helper_rejects_real_divergence(tiny_llm, hf_tiny):
    """The tolerance helper must fail when a token differs away from a tie."""
    prompt = tiny_llm.encode(PROMPTS[0])
    ref = hf_greedy(hf_tiny, prompt, 3)
    logits = hf_logits(hf_tiny, prompt + ref[:1])[-1]
    worst = int(logits.argmin())
    with pytest.raises(AssertionError, match="without a near-tie"):
        assert_same_tokens(hf_tiny, prompt, [ref[0], worst, ref[2]], ref)
    with pytest.raises(AssertionError):
        assert_same_tokens(hf_tiny, prompt, ref[:2], ref)


def test_cached_and_uncached_greedy_agree(tiny_llm, hf_tiny):
    prompts = PROMPTS[:2]
    cached = tiny_llm.generate(prompts, GREEDY20, use_cache=True)
    uncached = tiny_llm.generate(prompts, GREEDY20, use_cache=False)
    for c, u in zip(cached, uncached):
        assert len(c.token_ids) == 20 and c.finish_reason == "length"
        assert c.prompt_token_ids == u.prompt_token_ids
        assert_same_tokens(hf_tiny, c.prompt_token_ids, u.token_ids, c.token_ids)


def test_uncached_is_a_mode_of_the_engine_and_equals_the_cached_path(tiny_model_dir):
    """`use_cache=False` runs on the engine loop: every step computes the sequence again from
    its first token into fresh blocks, registering none in the prefix cache. Its greedy tokens
    equal the cached path's and those of a forward pass with no cache at all."""
    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    prompts = [llm.encode(p) for p in PROMPTS]
    uncached = llm.generate(prompts, GREEDY20, use_cache=False)
    stats = llm.stats()
    assert stats["prefix_hits"] == 0 and stats["blocks_cached"] == 0 and stats["blocks_used"] == 0
    # token k is sampled after computing the prompt and the k - 1 tokens before it, all of them
    assert stats["tokens_prefilled"] == sum(20 * len(p) + sum(range(20)) for p in prompts)
    cached = llm.generate(prompts, GREEDY20)
    for p, u, c in zip(prompts, uncached, cached):
        assert u.prompt_token_ids == p and u.metrics.cached_prompt_tokens == 0 and u.finish_reason == "length"
        assert u.token_ids == c.token_ids == recompute_greedy(llm.model, p, 20)
        assert u.text == c.text
    assert llm.stats()["tokens_prefilled"] == stats["tokens_prefilled"] + sum(map(len, prompts))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(tiny_llm, hf_tiny, prompt):
    out = tiny_llm.generate([prompt], GREEDY20)[0]
    assert out.prompt_token_ids == tiny_llm.tokenizer(prompt)["input_ids"]
    ref = hf_greedy(hf_tiny, out.prompt_token_ids, 20)
    assert len(ref) == 20
    assert len(set(ref)) > 3  # the tiny model is not stuck repeating one token
    assert_same_tokens(hf_tiny, out.prompt_token_ids, out.token_ids, ref)
    assert out.text == tiny_llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_ragged_batch_matches_each_prompt_alone(tiny_llm, hf_tiny):
    lens = [len(tiny_llm.encode(p)) for p in PROMPTS]
    assert len(set(lens)) == len(PROMPTS)  # really ragged
    batch = tiny_llm.generate(PROMPTS, GREEDY20)
    for prompt, out in zip(PROMPTS, batch):
        alone = tiny_llm.generate([prompt], GREEDY20)[0]
        assert out.prompt_token_ids == alone.prompt_token_ids
        assert_same_tokens(hf_tiny, alone.prompt_token_ids, out.token_ids, alone.token_ids)


def test_ragged_batch_uncached_matches_alone(tiny_llm, hf_tiny):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    batch = tiny_llm.generate(PROMPTS, params, use_cache=False)
    for prompt, out in zip(PROMPTS, batch):
        alone = tiny_llm.generate([prompt], params)[0]
        assert_same_tokens(hf_tiny, alone.prompt_token_ids, out.token_ids, alone.token_ids)


def test_ragged_batch_rows_finish_independently(tiny_llm, hf_tiny):
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 20, 9, 14)]
    outs = tiny_llm.generate(PROMPTS, params)
    full = tiny_llm.generate(PROMPTS, GREEDY20)
    for p, o, f in zip(params, outs, full):
        assert len(o.token_ids) == p.max_tokens and o.finish_reason == "length"
        assert_same_tokens(hf_tiny, o.prompt_token_ids, o.token_ids, f.token_ids[: p.max_tokens])


def test_stop_token_ids_end_generation(tiny_llm):
    """Make a token the greedy run produces a stop token: generation ends right after it."""
    out = tiny_llm.generate([PROMPTS[0]], GREEDY20)[0]
    stop_id = out.token_ids[3]
    first = out.token_ids.index(stop_id)
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop_id])
    stopped = tiny_llm.generate([PROMPTS[0]], params)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == out.token_ids[: first + 1]  # the stop token is reported, nothing after it
    assert stopped.text == tiny_llm.tokenizer.decode(out.token_ids[:first], skip_special_tokens=True)


def test_eos_ends_generation_unless_ignored(tiny_model_dir):
    """With the first greedy token declared EOS, generation stops at once; ignore_eos runs on."""
    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    free = llm.generate([PROMPTS[1]], GREEDY20)[0]
    llm.eos_ids = {free.token_ids[0]}
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:1] and out.text == ""
    assert llm.generate([PROMPTS[1]], GREEDY20)[0].token_ids == free.token_ids


# ----------------------------------------------------------------------------- chat session


def test_session_turns_match_chat_from_scratch(tiny_llm, hf_tiny):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    shape, fp32 = load_shape(tiny_llm.model_dir), KVFormat.parse("fp32")
    system = "You are a tiny test model."
    s = tiny_llm.session(system=system)
    bs = tiny_llm.engine.config.block_size
    messages = [{"role": "system", "content": system}]
    for turn, text in enumerate(["Hello, how are you?", "Tell me a joke about a computer.", "What is your name?"]):
        out = s.send(text, params)
        messages.append({"role": "user", "content": text})
        prompt = tiny_llm.chat_ids(messages)
        ref = tiny_llm.chat(messages, params)
        assert out.prompt_token_ids == ref.prompt_token_ids == prompt
        assert out.metrics.prompt_tokens == len(prompt)
        assert_same_tokens(hf_tiny, prompt, out.token_ids, ref.token_ids)
        if out.token_ids == ref.token_ids:
            assert out.text == ref.text and out.finish_reason == ref.finish_reason
        if turn == 0:
            assert out.metrics.cached_prompt_tokens == 0
        else:
            assert 0 < out.metrics.cached_prompt_tokens < out.metrics.prompt_tokens
        assert not out.metrics.history_truncated
        # the prompt and every generated token but the last one were computed; the engine's
        # prefix cache keeps their full blocks for the next turn
        assert s.token_ids == prompt + out.token_ids[:-1]
        stats = s.stats()
        assert stats["cached_tokens"] == len(s.token_ids) // bs * bs > 0
        assert stats["kv_cache_bytes"] == kv_bytes(shape, fp32, stats["cached_tokens"])
        messages.append({"role": "assistant", "content": out.text})
        assert s.messages == messages
    assert s.turns == 3


def test_session_stream_matches_send(tiny_model_dir):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    # each on its own engine: sessions of one engine share its prefix cache
    a, b = (kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False).session(system="Hi.")
            for _ in range(2))
    for text in ["Hello there", "Count to ten"]:
        *pieces, out = a.stream(text, params)
        ref = b.send(text, params)
        assert all(isinstance(p, str) for p in pieces)
        assert "".join(pieces) == out.text == ref.text
        assert out.token_ids == ref.token_ids
        assert out.metrics.cached_prompt_tokens == ref.metrics.cached_prompt_tokens
    assert a.messages == b.messages


def test_session_runs_on_the_engine_equals_dense_chat_and_computes_only_the_tail(tiny_model_dir):
    """Each turn is one engine request over the whole rendered conversation. Its reply equals
    greedy decoding of that conversation on a dense cache (the path sessions ran on before),
    and a later turn takes the full blocks the turn before computed from the prefix cache:
    it computes only the rest of its prompt."""
    llm = kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)  # empty prefix cache
    bs = llm.engine.config.block_size
    params = SamplingParams(max_tokens=10, temperature=0.0)
    s = llm.session(system="You are a tiny test model.")
    previous: list[int] = []
    for turn, text in enumerate(["Hello, how are you?", "Tell me a joke about a computer.", "What is your name?"]):
        prefilled = llm.stats()["tokens_prefilled"]
        out = s.send(text, params)
        prompt = out.prompt_token_ids
        assert out.token_ids == dense_greedy(llm.model, prompt, 10, llm.eos_ids)
        shared = next((i for i, (a, b) in enumerate(zip(previous, prompt)) if a != b), min(len(previous), len(prompt)))
        assert out.metrics.cached_prompt_tokens == shared // bs * bs  # every full block the last turn shares
        assert llm.stats()["tokens_prefilled"] - prefilled == len(prompt) - out.metrics.cached_prompt_tokens
        if turn:
            assert out.metrics.cached_prompt_tokens > len(previous) - bs  # the tail of one block at most
        previous = s.token_ids
    assert llm.stats()["blocks_used"] == 0


# ----------------------------------------------------------------------------- cache bytes


def _check_cache_bytes(llm, fmt: str, max_tokens: list[int]) -> None:
    """A ragged batch on the engine: each request reports the whole blocks it held at its last
    step (its prompt and every generated token but the last one) at the format's bytes."""
    shape, kvf = load_shape(llm.model_dir), KVFormat.parse(fmt)
    assert llm.kv_bytes_per_token == kv_bytes_per_token(shape, kvf)
    ids = [llm.encode(p) for p in PROMPTS[:3]]
    assert len({len(i) for i in ids}) == 3  # ragged
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    engine = llm.engine
    bs = engine.config.block_size
    assert engine.storage.bytes_per_block == kv_bytes(shape, kvf, bs)
    assert llm.stats()["kv_bytes_total"] == engine.config.num_blocks * kv_bytes(shape, kvf, bs)
    held_during = []
    reqs = [engine.add_request(i, p) for i, p in zip(ids, params)]
    engine.run_to_completion(reqs, on_step=lambda _: held_during.append(llm.stats()["kv_bytes_held"]))
    outs = [r.to_output() for r in reqs]
    assert [len(o.token_ids) for o in outs] == max_tokens
    held = [len(o.prompt_token_ids) + len(o.token_ids) - 1 for o in outs]
    for o, n in zip(outs, held):
        assert o.metrics.kv_cache_bytes == kv_bytes(shape, kvf, -(-n // bs) * bs)
    assert max(held_during) <= sum(o.metrics.kv_cache_bytes for o in outs)  # blocks shared count once
    assert llm.stats()["kv_bytes_held"] == 0


@pytest.mark.parametrize("which,fmt", [("fp32", "fp32"), ("bf16", "bf16")])
def test_cache_bytes_match_spec(tiny_llm, llm_bf16, which, fmt):
    _check_cache_bytes(tiny_llm if which == "fp32" else llm_bf16, fmt, [7, 7, 7])


def test_cache_bytes_rows_finishing_early(tiny_llm):
    _check_cache_bytes(tiny_llm, "fp32", [5, 9, 2])


def test_bf16_generation_runs(llm_bf16, tiny_llm):
    out = llm_bf16.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert llm_bf16.model.dtype == torch.bfloat16 and len(out.token_ids) == 8
    # bf16 logits stay close to fp32 ones
    ids = random_ids(10, tiny_llm.config.vocab_size, seed=7)
    torch.testing.assert_close(full_logits(llm_bf16.model, ids), full_logits(tiny_llm.model, ids),
                               atol=0.15, rtol=0)


# ----------------------------------------------------------------------------- max_model_len


def test_prompt_too_long_raises(llm16):
    prompt = random_ids(20, llm16.config.vocab_size, seed=8)[0].tolist()
    with pytest.raises(PromptTooLongError) as info:
        llm16.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))
    assert isinstance(info.value, ValueError) and isinstance(info.value, KVCacheError)
    with pytest.raises(PromptTooLongError):  # exactly max_model_len leaves no room either
        llm16.generate([prompt[:16]], SamplingParams(max_tokens=1, temperature=0.0))


def test_prompt_truncated_left(llm16_left):
    prompt = random_ids(20, llm16_left.config.vocab_size, seed=8)[0].tolist()
    out = llm16_left.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    n = len(out.prompt_token_ids)
    assert 0 < n < 20 and out.prompt_token_ids == prompt[-n:]
    assert n == 16 - 4  # room left for the requested tokens
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    # same tokens as generating from the kept suffix directly
    direct = llm16_left.generate([prompt[-n:]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert direct.token_ids == out.token_ids


def test_preprocess_gives_fitted_ids_and_params_per_prompt(llm16_left):
    """The public step every entry point (generate, stream, AsyncEngine) shares."""
    prompt = random_ids(20, llm16_left.config.vocab_size, seed=8)[0].tolist()
    sp = SamplingParams(max_tokens=4)
    ids, plist = llm16_left.preprocess(prompt, sp)  # one prompt given as ids
    assert ids == [prompt[-12:]] and plist == [sp]
    ids, plist = llm16_left.preprocess(["hello", prompt[:3]], sp)
    assert ids[0] == llm16_left.encode("hello") and ids[1] == prompt[:3] and plist == [sp, sp]
    for bad in ([], [[]], [[llm16_left.config.vocab_size]]):
        with pytest.raises(KVCacheError):
            llm16_left.preprocess(bad, sp)
    with pytest.raises(KVCacheError, match="2 SamplingParams for 1 prompts"):
        llm16_left.preprocess(["hello"], [sp, sp])


@pytest.mark.parametrize("prompt_len", [10, 15])
def test_generation_stops_at_max_model_len(llm16, tiny_llm, hf_tiny, prompt_len):
    prompt = random_ids(prompt_len, llm16.config.vocab_size, seed=9)[0].tolist()
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    with pytest.raises(PromptTooLongError, match="at most"):  # the API refuses what cannot fit
        llm16.generate([prompt], greedy(50))
    req = llm16.engine.add_request(prompt, greedy(50), eos_ids=set())  # below it the engine still stops
    llm16.engine.run_to_completion([req])
    out = llm16.generate([prompt], greedy(16 - prompt_len))[0]
    assert out.finish_reason == req.finish_reason == "length"
    assert len(prompt) + len(out.token_ids) == 16 and req.output_token_ids == out.token_ids
    unlimited = tiny_llm.generate([prompt], SamplingParams(max_tokens=16 - prompt_len, temperature=0.0,
                                                           ignore_eos=True))[0]
    assert_same_tokens(hf_tiny, prompt, out.token_ids, unlimited.token_ids)


# ----------------------------------------------------------------------------- stop strings, streaming


def _pick_stop(text: str) -> str:
    """A 3-character substring from the second half of `text`, free of U+FFFD."""
    for k in range(len(text) // 2, len(text) - 2):
        s = text[k : k + 3]
        if "\ufffd" not in s:
            return s
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_stop_string_truncates_text(tiny_llm, prompt):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    full = tiny_llm.generate([prompt], params)[0]
    assert len(full.text) >= 8
    stop = _pick_stop(full.text)
    cut = full.text.index(stop)
    out = tiny_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                     stop=[stop]))[0]
    assert out.text == full.text[:cut]
    assert stop not in out.text
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < len(full.token_ids)
    # streaming gives the same text, and no piece leaks the stop string
    pieces = list(tiny_llm.stream(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                         stop=stop)))
    assert "".join(pieces) == out.text
    assert all(stop not in p for p in pieces)


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_joined_equals_generate(tiny_llm, use_cache):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    pieces = list(tiny_llm.stream(PROMPTS[2], params, use_cache=use_cache))
    out = tiny_llm.generate([PROMPTS[2]], params)[0]
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == out.text


# ----------------------------------------------------------------------------- sampling


def test_same_seed_same_tokens(tiny_llm):
    p = SamplingParams(max_tokens=20, temperature=1.5, seed=1234, ignore_eos=True)
    a = tiny_llm.generate([PROMPTS[0]], p)[0].token_ids
    b = tiny_llm.generate([PROMPTS[0]], p)[0].token_ids
    assert a == b and len(a) == 20
    other = tiny_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=1.5, seed=4321,
                                                           ignore_eos=True))[0].token_ids
    assert other != a  # the seed matters (20 draws at temperature 1.5 never coincide by chance)
    greedy = tiny_llm.generate([PROMPTS[0]], GREEDY20)[0].token_ids
    assert a != greedy  # really sampling


def test_seeded_row_in_batch_matches_alone(tiny_llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    batch = tiny_llm.generate(PROMPTS[:3], p)
    for prompt, out in zip(PROMPTS[:3], batch):
        assert tiny_llm.generate([prompt], p)[0].token_ids == out.token_ids


@pytest.mark.parametrize("kw", [dict(top_k=1, temperature=0.7), dict(top_k=1, temperature=5.0),
                                dict(top_p=1e-6, temperature=1.0)], ids=["topk1-t0.7", "topk1-t5", "top_p-tiny"])
def test_truncated_sampling_equals_greedy(tiny_llm, hf_tiny, kw):
    greedy = tiny_llm.generate(PROMPTS[:2], GREEDY20)
    sampled = tiny_llm.generate(PROMPTS[:2], SamplingParams(max_tokens=20, ignore_eos=True, **kw))
    for g, s in zip(greedy, sampled):
        assert_same_tokens(hf_tiny, g.prompt_token_ids, s.token_ids, g.token_ids)


def test_repetition_penalty_changes_greedy_choice(tiny_llm):
    base = tiny_llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    pen = tiny_llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                         repetition_penalty=1e6))[0]
    seen = set(pen.prompt_token_ids)
    for t in pen.token_ids:  # with a huge penalty no token repeats while unseen ones have positive logits
        assert t not in seen
        seen.add(t)
    history = base.prompt_token_ids + base.token_ids
    assert len(set(history)) < len(history)  # without a penalty something does repeat
    assert pen.token_ids != base.token_ids


# ----------------------------------------------------------------------------- bad input


def _vocab(llm):
    return llm.config.vocab_size


@pytest.mark.parametrize("case", [
    "max_tokens=0", "temperature=-1", "empty text", "empty ids", "id too large", "negative id",
    "no prompts", "wrong number of params", "bad message", "empty session message",
])
def test_bad_input_raises_kvcache_error(tiny_llm, case):
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    calls = {
        "max_tokens=0": lambda: SamplingParams(max_tokens=0),
        "temperature=-1": lambda: SamplingParams(temperature=-1),
        "empty text": lambda: tiny_llm.generate([""], greedy),
        "empty ids": lambda: tiny_llm.generate([[]], greedy),
        "id too large": lambda: tiny_llm.generate([[5, _vocab(tiny_llm)]], greedy),
        "negative id": lambda: tiny_llm.generate([[5, -1]], greedy),
        "no prompts": lambda: tiny_llm.generate([], greedy),
        "wrong number of params": lambda: tiny_llm.generate(["a", "b"], [greedy]),
        "bad message": lambda: tiny_llm.chat([{"role": "user"}], greedy),
        "empty session message": lambda: tiny_llm.session().send("   ", greedy),
    }
    with pytest.raises(KVCacheError):
        calls[case]()


BAD_LLM_ARGS = [dict(dtype="float64"), dict(dtype="int8"), dict(max_model_len=1), dict(truncation="middle"),
                dict(threads=0), dict(kernels="no-such-kernels")]


@pytest.mark.parametrize("kwargs", BAD_LLM_ARGS, ids=str)
def test_bad_llm_arguments(tiny_model_dir, kwargs):
    with pytest.raises(KVCacheError):
        kvcache.LLM(str(tiny_model_dir), progress=False, device="cpu", **kwargs)


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError) as info:
        kvcache.LLM("no-such-model-xyz", progress=False)
    assert isinstance(info.value, KVCacheError)


def test_bad_session_overflow_policy(tiny_llm):
    with pytest.raises(KVCacheError):
        tiny_llm.session(overflow="drop-everything")


# ----------------------------------------------------------------------------- session overflow

TURNS = ["Hello there", "Tell me a joke", "What is your name?", "Explain attention", "Write a poem",
         "What is the weather?", "Count to ten", "Goodbye"]


def test_session_overflow_error(llm_short):
    s = llm_short.session(system="Be brief.", overflow="error")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    done = 0
    with pytest.raises(PromptTooLongError):
        for text in TURNS:
            s.send(text, params)
            done += 1
    assert done >= 1  # the first turn fits, a later one does not
    assert s.turns == done


def test_session_overflow_truncate(llm_short, hf_tiny):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    system = "Be brief."
    s = llm_short.session(system=system)  # overflow="truncate" is the default
    history: list[dict] = []  # every user / assistant message so far
    truncated, kept = [], []
    for turn, text in enumerate(TURNS):
        out = s.send(text, params)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": out.text}]
        truncated.append(out.metrics.history_truncated)
        kept.append(len(s.messages) - 1)
        assert s.messages[0] == {"role": "system", "content": system}
        assert s.messages[1:] == history[-(len(s.messages) - 1):]  # the oldest turns go first
        assert s.messages[1]["role"] == "user"  # whole exchanges are dropped
        assert out.metrics.prompt_tokens + len(out.token_ids) <= llm_short.max_model_len
        assert len(out.token_ids) == 8
        if turn:
            assert 0 < out.metrics.cached_prompt_tokens < out.metrics.prompt_tokens  # the system prompt stays cached
        # the kept history is exactly what the reply was computed from
        used = s.messages[:-1]
        assert out.prompt_token_ids == llm_short.chat_ids(used)
        ref = llm_short.chat(used, params)
        assert_same_tokens(hf_tiny, out.prompt_token_ids, out.token_ids, ref.token_ids)
    assert s.turns == len(TURNS)
    assert not truncated[0] and any(truncated)
    assert any(t and k > 2 for t, k in zip(truncated, kept))  # truncation kept an earlier exchange
    assert s.truncations == sum(truncated)


def test_session_overflow_summarize(tiny_llm, hf_tiny):
    """Past its budget the session condenses the oldest exchanges into a note after the
    system message (generated by the model from exactly those turns) and rebuilds the cache."""
    from kvcache.api.session import SUMMARY_PREFIX, SUMMARY_REQUEST

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    s = tiny_llm.session(system="Be brief.", overflow="summarize", max_history_tokens=120)
    summarized = []
    for text in TURNS:
        before = [m for m in s.messages if not m["content"].startswith(SUMMARY_PREFIX)][1:]
        out = s.send(text, params)
        summarized.append(out.metrics.history_summarized)
        assert out.metrics.prompt_tokens + len(out.token_ids) <= 120
        assert s.messages[0] == {"role": "system", "content": "Be brief."}
        if out.metrics.history_summarized:
            note = s.messages[1]
            assert note["role"] == "system" and note["content"] == SUMMARY_PREFIX + s.summary
            assert s.messages[2:-2] == before[len(before) - (len(s.messages) - 4):]  # newest turns kept verbatim
            assert out.metrics.cached_prompt_tokens < out.metrics.prompt_tokens // 2  # rebuilt after the note
        assert out.prompt_token_ids == tiny_llm.chat_ids(s.messages[:-1])
    assert not summarized[0] and any(summarized)
    assert s.stats()["summaries"] >= sum(summarized)
    # the note is what the model says about those turns, greedy, from the summary request
    assert s.summary is not None
    with pytest.raises(KVCacheError, match="max_history_tokens"):
        tiny_llm.session(overflow="summarize", max_history_tokens=10**9)
    assert SUMMARY_REQUEST
