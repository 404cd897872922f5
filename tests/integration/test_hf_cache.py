"""kvcache.hf: our KV policies as transformers Cache objects, on the tiny random Llama.

Checked against transformers' own DynamicCache (keep-everything must give the same tokens)
and against our own LlamaModel driving kvcache's SequenceCache with the same policy on the
same weights (window, sinks, knorm must give the same tokens, up to near-ties).
"""

from __future__ import annotations

import pytest
import torch

import kvcache.hf
from kvcache.cache.policies.scorers import SCORERS
from kvcache.hf import KEY_ONLY_SCORERS
from kvcache.cache.policies.cache import SequenceCache
from kvcache.errors import KVCacheError
from kvcache.models.config import LlamaConfig
from kvcache.models.llama import LlamaModel
from kvcache.models.step import StepInputs
from tests.helpers import assert_same_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_LEN = 40
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ours(hf_tiny):
    return LlamaModel.from_state_dict(LlamaConfig.from_hf(hf_tiny.config.to_dict()), hf_tiny.state_dict())


@pytest.fixture(scope="module")
def prompt(hf_tiny):
    gen = torch.Generator().manual_seed(7)
    return torch.randint(3, hf_tiny.config.vocab_size, (1, PROMPT_LEN), generator=gen)


def hf_generate(model, ids, cache, n=NEW_TOKENS):
    """Greedy tokens and the logits of each step, through transformers' generate (no stop at EOS)."""
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n,
                             eos_token_id=None, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [x[0] for x in out.logits]


def ours_generate(model, policy, ids, n=NEW_TOKENS):
    """Greedy tokens from our own model and kvcache's SequenceCache."""
    cache = SequenceCache(model, policy)
    tokens = []
    with torch.inference_mode():
        logits = model.forward(StepInputs(ids, None, 0, None), cache)
        for _ in range(n):
            tokens.append(int(logits[0].argmax()))
            step = StepInputs(torch.tensor([[tokens[-1]]]), None, cache.next_position, None)
            logits = model.forward(step, cache)
    return tokens


def assert_same_greedy(prompt, got, want, want_logits):
    ids = prompt[0].tolist()
    assert_same_tokens(lambda seq: want_logits[len(seq) - len(ids)], ids, got, want)


def test_keep_everything_gives_dynamic_cache_tokens(hf_tiny, prompt):
    from transformers import DynamicCache

    want, _ = hf_generate(hf_tiny, prompt, DynamicCache(config=hf_tiny.config))
    cache = kvcache.hf.PolicyCache("full", config=hf_tiny.config)
    got, _ = hf_generate(hf_tiny, prompt, cache)
    assert got == want
    assert cache.seen == cache.kept == PROMPT_LEN + NEW_TOKENS - 1  # the last token is never fed back


@pytest.mark.parametrize("policy, hf_cache", [
    ("window:size=16", lambda cfg: kvcache.hf.WindowCache(16, config=cfg)),
    ("sinks:n_sink=4,window=16", lambda cfg: kvcache.hf.SinkCache(n_sink=4, window=16, config=cfg)),
    ("evict:scorer=knorm,ratio=0.5,window=8", lambda cfg: kvcache.hf.KnormCache(0.5, window=8, config=cfg)),
    *((f"evict:scorer={name},ratio=0.5,window=8", lambda cfg, name=name: kvcache.hf.PolicyCache(
        f"evict:scorer={name},ratio=0.5,window=8", config=cfg)) for name in KEY_ONLY_SCORERS),
    ("evict:scorer=knorm,budget=20,window=4,decode=true+window:size=24",
     lambda cfg: kvcache.hf.PolicyCache("evict:scorer=knorm,budget=20,window=4,decode=true+window:size=24",
                                        config=cfg)),
])
def test_policy_matches_our_engine(hf_tiny, ours, prompt, policy, hf_cache):
    cache = hf_cache(hf_tiny.config)
    got, got_logits = hf_generate(hf_tiny, prompt, cache)
    want = ours_generate(ours, policy, prompt)
    assert_same_greedy(prompt, want, got, got_logits)
    assert cache.stats()["evicted"] > 0
    assert cache.kept < cache.seen == PROMPT_LEN + NEW_TOKENS - 1


def test_sinks_with_a_window_past_the_sequence_is_the_dynamic_cache(hf_tiny, prompt):
    """Un-rotating keys into the store and rotating them back on read changes nothing."""
    from transformers import DynamicCache

    want, want_logits = hf_generate(hf_tiny, prompt, DynamicCache())
    got, _ = hf_generate(hf_tiny, prompt, kvcache.hf.SinkCache(n_sink=4, window=200, config=hf_tiny.config))
    assert_same_greedy(prompt, got, want, want_logits)


def test_sinks_run_past_the_model_context(hf_tiny):
    """Positions keep counting past max_position_embeddings (256) while the cache stays small."""
    ids = torch.randint(3, hf_tiny.config.vocab_size, (1, 250), generator=torch.Generator().manual_seed(3))
    cache = kvcache.hf.SinkCache(n_sink=4, window=32, config=hf_tiny.config)
    tokens, logits = hf_generate(hf_tiny, ids, cache, n=20)
    assert len(tokens) == 20 and all(torch.isfinite(x).all() for x in logits)
    assert cache.seen == 269 and cache.kept <= 4 + 32 + 15


def test_memory_is_what_the_store_holds(hf_tiny, prompt):
    c = hf_tiny.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # fp32 K and V
    full = kvcache.hf.PolicyCache(config=hf_tiny)  # the model itself is accepted too
    window = kvcache.hf.WindowCache(16, config=c)
    assert full.nbytes == window.nbytes == 0
    hf_generate(hf_tiny, prompt, full, n=8)
    hf_generate(hf_tiny, prompt, window, n=8)
    assert full.nbytes == (PROMPT_LEN + 7) * per_token
    assert window.nbytes == window.kept * per_token and window.kept <= 16 + 15
    assert full.nbytes_allocated >= full.nbytes
    assert full.layers[1].keys.shape == (1, c.num_key_value_heads, PROMPT_LEN + 7, c.head_dim)


def test_cache_continues_across_generate_calls(hf_tiny, prompt):
    from transformers import DynamicCache

    want, _ = hf_generate(hf_tiny, prompt, DynamicCache(), n=12)
    cache = kvcache.hf.PolicyCache("full", config=hf_tiny.config)
    first, _ = hf_generate(hf_tiny, prompt, cache, n=6)
    ids = torch.cat([prompt, torch.tensor([first])], 1)
    second, _ = hf_generate(hf_tiny, ids, cache, n=6)
    assert first + second == want


def test_crop_and_reset(hf_tiny, prompt):
    cache = kvcache.hf.PolicyCache("full", config=hf_tiny.config)
    hf_generate(hf_tiny, prompt, cache, n=4)
    cache.crop(-3)
    assert cache.get_seq_length() == PROMPT_LEN + 3 - 3
    cache.reset()
    assert cache.seen == cache.kept == cache.nbytes == 0
    window = kvcache.hf.WindowCache(16, config=hf_tiny.config)
    hf_generate(hf_tiny, prompt, window, n=4)
    with pytest.raises(KVCacheError, match="evicted"):
        window.crop(-1)


@pytest.mark.parametrize("policy, message", [
    ("lru:size=3", "Unknown KV policy"),
    ("window:width=3", "no key 'width'"),
    *((f"evict:scorer={name},ratio=0.5", "needs the attention queries.*knorm")
      for name, scorer in SCORERS.items() if scorer.needs_queries),
])
def test_bad_policies_are_kvcache_errors(hf_tiny, policy, message):
    with pytest.raises(KVCacheError, match=message):
        kvcache.hf.PolicyCache(policy, config=hf_tiny.config)


def test_config_is_required_and_a_cache_keeps_its_batch_size(hf_tiny, prompt):
    with pytest.raises(KVCacheError, match="config"):
        kvcache.hf.WindowCache(16)
    cache = kvcache.hf.WindowCache(16, config=hf_tiny.config)
    hf_generate(hf_tiny, prompt.repeat(2, 1), cache, n=2)
    assert cache.batch_size == 2
    with pytest.raises(KVCacheError, match="holds 2 sequences.*batch of 3"):
        hf_generate(hf_tiny, prompt.repeat(3, 1), cache, n=2)


def test_quantized_cache_stays_close_to_exact(hf_tiny, prompt):
    cache = kvcache.hf.QuantizedCache(bits=8, group_size=16, residual=16, config=hf_tiny.config)
    got, _ = hf_generate(hf_tiny, prompt, cache, n=8)
    assert len(got) == 8
    c = hf_tiny.config
    exact = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * cache.kept  # fp32 bytes
    assert 0 < cache.nbytes < exact


@pytest.mark.real_model
def test_seed_example_on_the_default_model():
    """The README example: SmolLM2 generates through a SinkCache, as it does with DynamicCache."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvcache.models.loader import load_model

    model_dir = str(load_model("smollm2-135m-instruct", progress=False).model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = inputs["input_ids"].shape[1]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is transformers' old name for cache=
        cache = kvcache.hf.SinkCache(n_sink=4, window=1020, config=model.config)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=20, do_sample=False)
        want = model.generate(**inputs, cache=DynamicCache(), max_new_tokens=20, do_sample=False)
        small = kvcache.hf.SinkCache(n_sink=4, window=16, config=model.config)
        short = model.generate(**inputs, cache=small, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, n:], skip_special_tokens=True)
    assert "Paris" in text
    assert out[0, n:].tolist() == want[0, n:].tolist()  # nothing evicted: the same greedy tokens
    assert tok.decode(short[0, n:], skip_special_tokens=True).strip()
    assert small.kept <= 4 + 16 + 15 < small.seen
    assert small.nbytes == small.kept * 2 * 30 * 3 * 64 * 4


def left_padded(rows: list[torch.Tensor], pad: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (each (n,)) as one left-padded batch: ids and attention mask (B, width or the longest n)."""
    width = max(width, *(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return ids, mask


def hf_generate_batch(model, ids, mask, cache, n=NEW_TOKENS, **kw):
    """Greedy tokens of each row and each row's step logits, through transformers' generate."""
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=n, eos_token_id=None,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, **kw)
    tokens = out.sequences[:, ids.shape[1]:].tolist()
    return tokens, [[x[b] for x in out.logits] for b in range(ids.shape[0])]


@pytest.mark.parametrize("window", [16, 200])
def test_sinks_on_a_left_padded_row_give_the_unpadded_tokens(hf_tiny, prompt, window):
    """Positions from the attention mask start at the first real token: padding is no key to keep."""
    ids, mask = left_padded([prompt[0]], hf_tiny.config.pad_token_id, width=PROMPT_LEN + 5)
    want, want_logits = hf_generate(hf_tiny, prompt, kvcache.hf.SinkCache(n_sink=4, window=window,
                                                                           config=hf_tiny.config))
    cache = kvcache.hf.SinkCache(n_sink=4, window=window, config=hf_tiny.config)
    got, _ = hf_generate_batch(hf_tiny, ids, mask, cache)
    assert_same_greedy(prompt, got[0], want, want_logits)
    assert cache.stats()["seen"] == PROMPT_LEN + NEW_TOKENS - 1  # the padding is not in the cache
    assert cache.seen == PROMPT_LEN + 5 + NEW_TOKENS - 1  # but it counts in transformers' positions


BATCH_CACHES = {
    "full": lambda cfg: kvcache.hf.PolicyCache("full", config=cfg),
    "window": lambda cfg: kvcache.hf.WindowCache(16, config=cfg),
    "sinks": lambda cfg: kvcache.hf.SinkCache(n_sink=4, window=16, config=cfg),
    "knorm": lambda cfg: kvcache.hf.KnormCache(0.5, window=8, decode=True, config=cfg),
    "quantized": lambda cfg: kvcache.hf.QuantizedCache(bits=4, group_size=16, residual=8, config=cfg),
}


@pytest.fixture(scope="module")
def ragged(prompt):
    """Three prompts of different lengths, so rows are padded and evict at different steps."""
    return [prompt[0], prompt[0, 3:32], prompt[0, 9:32]]


@pytest.mark.parametrize("name", BATCH_CACHES)
def test_a_left_padded_batch_gives_each_row_its_own_tokens(hf_tiny, ragged, name):
    """Each row keeps what it would keep alone: same greedy tokens, same kept and evicted counts."""
    make = BATCH_CACHES[name]
    ids, mask = left_padded(ragged, hf_tiny.config.pad_token_id)
    cache = make(hf_tiny.config)
    got, _ = hf_generate_batch(hf_tiny, ids, mask, cache)
    assert cache.batch_size == len(ragged)
    for b, row in enumerate(ragged):
        alone = make(hf_tiny.config)
        want, want_logits = hf_generate(hf_tiny, row[None], alone)
        assert_same_greedy(row[None], got[b], want, want_logits)
        assert cache.row_stats()[b] == alone.stats()
    kept = [r["kept"] for r in cache.row_stats()]
    assert cache.kept == sum(kept)
    if name not in ("full", "quantized"):  # rows evicted different amounts: the zeros before the shorter rows are masked
        assert len(set(kept)) > 1 and cache.stats()["evicted"] > 0


def test_full_policy_batch_is_the_dynamic_cache_batch(hf_tiny, ragged):
    from transformers import DynamicCache

    ids, mask = left_padded(ragged, hf_tiny.config.pad_token_id)
    want, _ = hf_generate_batch(hf_tiny, ids, mask, DynamicCache(config=hf_tiny.config))
    got, _ = hf_generate_batch(hf_tiny, ids, mask, kvcache.hf.PolicyCache("full", config=hf_tiny.config))
    assert got == want


def test_a_right_padded_batch_with_the_full_policy_is_the_dynamic_cache_batch(hf_tiny, ragged):
    """Padding after the real tokens (transformers' own generation tests pad so): such rows are kept whole,
    padding included, as DynamicCache keeps them, and transformers' mask hides it."""
    from transformers import DynamicCache

    ids, mask = left_padded(ragged, hf_tiny.config.pad_token_id)
    ids, mask = ids.flip(1), mask.flip(1)  # (B, T): real tokens first (reversed, which does not matter here)
    want, want_logits = hf_generate_batch(hf_tiny, ids, mask, DynamicCache(config=hf_tiny.config), n=8)
    cache = kvcache.hf.PolicyCache("full", config=hf_tiny.config)
    got, got_logits = hf_generate_batch(hf_tiny, ids, mask, cache, n=8)
    assert got == want
    assert torch.allclose(torch.stack(got_logits[1]), torch.stack(want_logits[1]), atol=1e-5)
    assert cache.layers[0].keys.shape[2] == ids.shape[1] + 8 - 1  # every column, as DynamicCache holds


def test_sinks_on_a_right_padded_batch_ask_for_left_padding(hf_tiny, ragged):
    ids, mask = left_padded(ragged, hf_tiny.config.pad_token_id)
    with pytest.raises(KVCacheError, match="pad on the left"):
        hf_generate_batch(hf_tiny, ids.flip(1), mask.flip(1), kvcache.hf.SinkCache(4, 16, config=hf_tiny.config), n=2)


def test_beam_search_with_the_full_policy_is_the_dynamic_cache(hf_tiny, ragged):
    from transformers import DynamicCache

    ids, mask = left_padded(ragged[1:], hf_tiny.config.pad_token_id)
    beams = dict(num_beams=3, num_return_sequences=2, n=12)
    want, _ = hf_generate_batch(hf_tiny, ids, mask, DynamicCache(config=hf_tiny.config), **beams)
    cache = kvcache.hf.PolicyCache("full", config=hf_tiny.config)
    got, _ = hf_generate_batch(hf_tiny, ids, mask, cache, **beams)
    assert got == want
    assert cache.batch_size == 2 * 3


def test_beam_search_through_an_evicting_cache_runs(hf_tiny, prompt):
    cache = kvcache.hf.SinkCache(n_sink=4, window=16, config=hf_tiny.config)
    got, _ = hf_generate_batch(hf_tiny, prompt, torch.ones_like(prompt), cache, num_beams=2, n=24)
    assert len(got[0]) == 24 and cache.batch_size == 2
    assert all(r["evicted"] > 0 for r in cache.row_stats())


def test_rows_are_copied_when_taken_twice(hf_tiny, prompt):
    cache = kvcache.hf.WindowCache(16, config=hf_tiny.config)
    hf_generate(hf_tiny, prompt, cache, n=4)
    cache.batch_repeat_interleave(3)
    assert cache.batch_size == 3 and len({id(r) for r in cache.rows}) == 3
    assert cache.row_stats() == [cache.row_stats()[0]] * 3
    cache.batch_select_indices(torch.tensor([2, 0]))
    keys = cache.layers[0].keys
    assert keys.shape[0] == 2 and torch.equal(keys[0], keys[1])
    cache.rows[0].clear()
    assert cache.row_stats()[1]["kept"] > 0


def test_rows_that_evicted_apart_need_sdpa(tiny_model_dir, ragged):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids, mask = left_padded(ragged, eager.config.pad_token_id)
    full, _ = hf_generate_batch(eager, ids, mask, kvcache.hf.PolicyCache("full", config=eager.config), n=4)
    assert len(full) == 3  # nothing evicted: transformers' padding mask is enough
    with pytest.raises(KVCacheError, match="attn_implementation='sdpa'"):
        hf_generate_batch(eager, ids, mask, kvcache.hf.WindowCache(16, config=eager.config))


@pytest.fixture(scope="module")
def assistant(hf_tiny):
    """A second tiny Llama on the same vocabulary, other weights: it drafts tokens the target partly rejects."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(11)
    return LlamaForCausalLM(hf_tiny.config).eval()


@pytest.fixture(scope="module")
def repetitive(prompt):
    """A prompt that repeats itself, so prompt-lookup decoding finds drafts."""
    return torch.cat([prompt[:, :20], prompt[:, :20], prompt[:, :12]], 1)


@pytest.mark.parametrize("how", ["assistant", "prompt_lookup"])
def test_assisted_decoding_with_the_full_policy_is_the_dynamic_cache(hf_tiny, assistant, repetitive, how):
    from transformers import DynamicCache

    kw = dict(assistant_model=assistant) if how == "assistant" else dict(prompt_lookup_num_tokens=4)
    ones = torch.ones_like(repetitive)
    plain, _ = hf_generate(hf_tiny, repetitive, DynamicCache(config=hf_tiny.config), n=24)
    want, _ = hf_generate_batch(hf_tiny, repetitive, ones, DynamicCache(config=hf_tiny.config), n=24, **kw)
    cache = kvcache.hf.PolicyCache("full", config=hf_tiny.config)
    got, _ = hf_generate_batch(hf_tiny, repetitive, ones, cache, n=24, **kw)
    assert got[0] == want[0] == plain
    assert cache.is_croppable and cache.seen == cache.kept == repetitive.shape[1] + 24 - 1


def test_an_evicting_cache_is_not_croppable(hf_tiny, assistant, prompt):
    window = kvcache.hf.WindowCache(200, config=hf_tiny.config)
    hf_generate(hf_tiny, prompt, window, n=4)
    assert window.is_croppable  # nothing evicted yet
    window.crop(-2)
    assert window.seen == PROMPT_LEN + 3 - 2
    small = kvcache.hf.WindowCache(16, config=hf_tiny.config)
    with pytest.raises(ValueError, match="cropped"):
        hf_generate_batch(hf_tiny, prompt, torch.ones_like(prompt), small, n=8, assistant_model=assistant)
    assert not small.is_croppable
