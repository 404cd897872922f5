"""Every KV policy through the same checks, on the tiny random-weight model.

- a policy that keeps everything gives exactly the dense cache's logits and tokens;
- the memory report equals the bytes the store holds;
- eviction keeps what each policy promises (window, sinks, budget/ratio, recent tokens);
- attention sinks stream past 3x max_position_embeddings with finite logits and bounded memory.
"""

from __future__ import annotations

import math

import pytest
import torch

import kvcache
from kvcache import KVCacheError, SamplingParams
from kvcache.cache.dense import KVCache
from kvcache.cache.policies.cache import SequenceCache
from kvcache.cache.policies.grammar import POLICY_PARAMS, parse_policy
from kvcache.cache.policies.scorers import SCORERS
from kvcache.cache.policies.selectors import EVICT_UNIT
from kvcache.models.step import StepInputs
from tests.helpers import dense_greedy, feed, policy_cache_greedy

BIG = 100_000
KEEP_ALL = [
    "full",
    f"window:size={BIG}",
    f"sinks:n_sink=4,window={BIG}",
    *(f"evict:scorer={name},budget={BIG},decode=true" for name in SCORERS),
    f"sinks:n_sink=2,window={BIG}+evict:scorer=h2o,budget={BIG}",
    f"quantized:bits=2,residual={BIG}",
    f"tiered:hot={BIG}",
    f"sinks:n_sink=4,window={BIG}+quantized:bits=4,residual={BIG}",
]
EVICTING = [
    "window:size=40",
    "sinks:n_sink=4,window=36",
    "evict:scorer=h2o,ratio=0.5",
    "evict:scorer=snapkv,ratio=0.5,window=8",
    *(f"evict:scorer={name},budget=32,decode=true" for name in SCORERS),
    "sinks:n_sink=4,window=60+evict:scorer=knorm,ratio=0.5",
    "sinks:n_sink=4,window=32+quantized:bits=4,group_size=16,residual=16",
    "evict:scorer=h2o,ratio=0.5+quantized:bits=8,group_size=16,residual=8",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def text_ids(llm, n: int) -> list[int]:
    ids = llm.tokenizer("Once upon a time there was a little robot who loved to read books. " * 40)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def expected_bytes(cache: SequenceCache) -> int:
    """What the memory math (`cache.spec`) says the cache's tokens cost, tier by tier."""
    from kvcache.cache.policies.quantized_store import value_group
    from kvcache.cache.policies.quantized_store import layer_bits
    from kvcache.cache.spec import kv_layers_bytes

    store = cache.store
    per_token = cache.bytes_per_token
    if store.kind == "full":
        return cache.length * store.bytes_per_token
    c = cache
    exact = (store.sinks.length + store.tail.length) * store.tail.bytes_per_token // per_token
    nq = store.num_quantized
    key_bits, value_bits = layer_bits(cache.spec.store, c.num_layers)  # from the policy, not the store
    value_groups = cache.spec.store.params.get("value_group_size") or value_group(store.group_size, c.head_dim)
    quant = (kv_layers_bytes(key_bits, store.group_size, nq, c.num_kv_heads, c.head_dim, "channel")
             + kv_layers_bytes(value_bits, value_groups, nq, c.num_kv_heads, c.head_dim, "token"))
    return exact * per_token + quant


# ------------------------------------------------------------------------ the grammar


@pytest.mark.parametrize("text", [
    "quantized:bits=4,group_size=64,residual=128", "sinks:n_sink=4,window=1020", "window:size=1024",
    "evict:scorer=snapkv,ratio=0.5", "tiered:hot=256,warm_bits=4,cold=disk",
    "sinks:n_sink=4,window=2044+quantized:bits=8",
])
def test_the_issue_examples_parse(text):
    spec = parse_policy(text)
    given = {p.split(":")[0] for p in text.split("+")}
    assert {s.name for s in spec.selectors} | {spec.store.name} >= given - {"full"}


def test_parsed_values_are_typed_and_defaults_filled():
    spec = parse_policy("sinks:n_sink=2,window=100+quantized:bits=4")
    assert spec.selectors[0].params == {"n_sink": 2, "window": 100}
    assert spec.store.params["bits"] == 4 and spec.store.params["residual"] == 128
    assert parse_policy(None).is_full and parse_policy("").is_full and not spec.is_full


@pytest.mark.parametrize("text, words", [
    ("windw:size=3", ["Unknown KV policy", "window", "sinks", "evict", "quantized", "tiered"]),
    ("window:sz=3", ["no key 'sz'", "size"]),
    ("quantized:bits=3", ["bits must be one of 8, 4, 2"]),
    ("window:size=abc", ["not a valid int"]),
    ("window:size", ["needs a value"]),
    ("evict:scorer=h2o", ["exactly one of ratio"]),
    ("evict:scorer=h2o,ratio=1.5", ["below 1"]),
    ("quantized:bits=8+tiered:hot=4", ["one storage part"]),
])
def test_bad_policy_strings_name_the_problem_and_the_valid_choices(text, words):
    with pytest.raises(KVCacheError) as err:
        parse_policy(text)
    for w in words:
        assert w in str(err.value)


def test_every_policy_name_has_documented_defaults():
    for name, schema in POLICY_PARAMS.items():
        for key, p in schema.items():
            assert isinstance(p.default, p.type), (name, key)


def test_the_grammar_is_the_policy_classes_declarations():
    from kvcache.cache.policies.registry import POLICIES

    assert set(POLICY_PARAMS) == set(POLICIES) == {"window", "sinks", "evict", "full", "quantized", "tiered"}
    for name, cls in POLICIES.items():
        assert POLICY_PARAMS[name] is cls.params and cls.role in ("selector", "store")
        assert parse_policy(name if name != "evict" else "evict:ratio=0.5").canonical.count(name) >= (name != "full")


@pytest.mark.parametrize("text, n_sink", [
    ("quantized:bits=2", 4),  # KIVI at 2 bits: exact sinks by default (+1.1% vs +85% perplexity at 1k tokens)
    ("quantized:bits=2,n_sink=0", 0),  # what the user says wins
    ("quantized:bits=2,key_axis=token,residual=0", 0),  # the paged format stays paged
    ("quantized:bits=4", 0),
    ("quantized", 0),
])
def test_two_bit_kivi_keeps_four_exact_sinks_by_default(text, n_sink):
    assert parse_policy(text).store.params["n_sink"] == n_sink


# ------------------------------------------------------------- keep-everything == dense


@pytest.mark.parametrize("policy", KEEP_ALL)
def test_a_policy_that_keeps_everything_matches_the_dense_cache(tiny_llm, policy):
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 70)
    dense = feed(model, KVCache.for_model(model, 1, 16), ids, chunk=16)
    cache = SequenceCache(model, policy)
    ours = feed(model, cache, ids, chunk=16)
    assert cache.length == cache.seen == len(ids)
    torch.testing.assert_close(ours, dense, rtol=0, atol=1e-5)
    assert policy_cache_greedy(model, policy, ids, GREEDY.max_tokens) == dense_greedy(model, ids, GREEDY.max_tokens)


def test_llm_kv_policy_runs_generate_stream_and_session(tiny_model_dir):
    llm = kvcache.LLM(str(tiny_model_dir), progress=False, kv_policy="window:size=24")
    dense = kvcache.LLM(str(tiny_model_dir), progress=False)
    prompt = "Once upon a time there was a little robot who loved to read books about the stars"
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    out = llm.generate([prompt, "Hello"], params)
    assert [len(o.token_ids) for o in out] == [30, 30]
    assert "".join(llm.stream(prompt, params)) == out[0].text
    assert dense.generate([prompt], params)[0].token_ids != out[0].token_ids  # the window changed something
    session = llm.session()
    turns = [session.send("Hello, how are you?", params), session.send("What is your name?", params)]
    # a chat turn runs on the engine under the window: it holds the window's blocks, not the conversation
    bs, engine = llm.engine.config.block_size, llm.engine
    for out in turns:
        seen = out.metrics.prompt_tokens + len(out.token_ids) - 1
        assert out.metrics.kv_cache_bytes <= (-(-(24 + bs) // bs) + 1) * engine.storage.bytes_per_block
        assert out.metrics.kv_cache_bytes < seen * llm.engine_bytes_per_token
    # blocks the window let go stay in the prefix cache: the next turn starts from them
    assert turns[1].metrics.cached_prompt_tokens >= bs and engine.stats()["blocks_used"] == 0
    with pytest.raises(KVCacheError, match="valid policies"):
        kvcache.LLM(str(tiny_model_dir), progress=False, kv_policy="lru:size=3")


# ----------------------------------------------------------------------- eviction


@pytest.mark.parametrize("policy", EVICTING)
def test_eviction_keeps_what_the_policy_promises(tiny_llm, policy):
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 120)
    cache = SequenceCache(model, policy)
    logits = feed(model, cache, ids[:100], chunk=20)
    assert torch.isfinite(logits).all()
    for t in ids[100:]:  # decode steps
        feed(model, cache, [t], chunk=1)
    assert cache.seen == 120
    assert cache.nbytes_used == expected_bytes(cache)
    sel = cache.spec.selectors
    bound = {
        "window": lambda p: p["size"] + EVICT_UNIT - 1,
        "sinks": lambda p: p["n_sink"] + p["window"] + EVICT_UNIT - 1,
    }
    for part in sel:
        if part.name in bound:
            assert cache.length <= bound[part.name](part.params)
    if sel[-1].name == "evict":
        p = sel[-1].params
        target = p["budget"] or math.ceil((1 - p["ratio"]) * 100)
        slack = EVICT_UNIT - 1 if p["decode"] else 20
        assert cache.length <= target + slack


def test_window_keeps_exactly_the_most_recent_tokens(tiny_llm):
    """Dropped tokens are the oldest: layer 0's kept K (which depend only on the token and
    its position) equal the dense cache's last K."""
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 90)
    dense = KVCache.for_model(model, 1, 16)
    feed(model, dense, ids, chunk=10)
    cache = SequenceCache(model, "window:size=32")
    feed(model, cache, ids, chunk=10)
    n = cache.length
    assert 32 <= n < 32 + EVICT_UNIT
    keys, _ = cache.store.read(0, 0)
    torch.testing.assert_close(keys, dense.k[0, :, :, 90 - n : 90], rtol=0, atol=1e-5)


def test_knorm_keeps_the_lowest_norm_keys_and_the_recent_window(tiny_llm):
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 64)
    dense = KVCache.for_model(model, 1, 16)
    feed(model, dense, ids, chunk=64)
    cache = SequenceCache(model, "evict:scorer=knorm,budget=24,window=8")
    feed(model, cache, ids, chunk=64)
    assert cache.length == 24
    for layer in range(model.config.num_layers):
        norms = dense.k[layer, 0, :, :64].norm(dim=-1)  # (Hkv, S)
        kept, _ = cache.store.read(layer, 0)
        for h in range(norms.shape[0]):
            want = set(norms[h, :56].topk(16, largest=False).indices.tolist()) | set(range(56, 64))
            got = {int((dense.k[layer, 0, h, :64] - row).abs().sum(-1).argmin()) for row in kept[0, h]}
            assert got == want


def test_h2o_keeps_the_tokens_with_the_most_attention(tiny_llm):
    """The kept set is the top accumulated attention, computed here independently."""
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 48)
    cache = SequenceCache(model, "evict:scorer=h2o,budget=20,window=4")
    seen: dict[int, torch.Tensor] = {}
    orig = cache.observe

    def spy(layer, q, k):
        seen[layer] = (q.clone(), k.clone())
        orig(layer, q, k)

    cache.observe = spy
    feed(model, cache, ids, chunk=48)
    q, k = seen[0]
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1)  # (1, Hq, S, D)
    att = (q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    att = att.masked_fill(torch.ones(48, 48, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    score = att.sum(2).view(1, k.shape[1], g, 48).sum(2)[0]  # (Hkv, S)
    kept, _ = cache.store.read(0, 0)
    for h in range(k.shape[1]):
        want = set(score[h, :44].topk(16).indices.tolist()) | set(range(44, 48))
        got = {int((k[0, h] - row).abs().sum(-1).argmin()) for row in kept[0, h]}
        assert got == want


# ---------------------------------------------------------------- streaming with sinks


def test_sinks_stream_past_three_times_the_trained_length(tiny_llm):
    model = tiny_llm.model
    limit = model.config.max_position_embeddings
    ids = text_ids(tiny_llm, 500)
    stream = (ids * 10)[: 3 * limit + 100]
    cache = SequenceCache(model, "sinks:n_sink=4,window=60")
    resident = []
    with torch.inference_mode():
        logits = feed(model, cache, stream[:64], chunk=64)
        for t in stream[64:]:
            logits = model.forward(StepInputs(torch.tensor([[t]]), None, cache.next_position, None), cache)
            assert torch.isfinite(logits).all()
            assert cache.next_position < limit
            resident.append((cache.nbytes_used, cache.nbytes_allocated))
    assert cache.seen == len(stream) > 3 * limit
    assert max(r[0] for r in resident) <= (4 + 60 + EVICT_UNIT - 1) * cache.bytes_per_token
    assert len({r[1] for r in resident[len(resident) // 10 :]}) == 1  # the allocation stopped growing


# ------------------------------------------------------- window on the paged engine


def test_paged_window_frees_blocks_and_matches_the_per_sequence_cache(tiny_model_dir):
    """`window` runs in the continuous-batching engine by freeing whole blocks; a ragged
    batch there gives exactly the tokens each prompt gets alone on a SequenceCache."""
    llm = kvcache.LLM(str(tiny_model_dir), progress=False, kv_policy="window:size=24", block_size=16)
    assert llm.paged_plan is not None
    prompts = ["Once upon a time there was a little robot who loved to read books about the stars",
               "Hello", "The weather today is sunny with a light breeze from the west, and tomorrow"]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    reqs = [engine.add_request(llm.encode(p), params, eos_ids=llm.eos_ids) for p in prompts]
    most_blocks = 0

    def watch(_):
        nonlocal most_blocks
        for r in reqs:
            if r.request_id in engine.kv and not r.finished:
                table = engine.kv.block_table(r.request_id)
                live = [b for b in table if b >= 0]
                most_blocks = max(most_blocks, len(live))

    engine.run_to_completion(reqs, on_step=watch)
    assert most_blocks <= -(-(24 + 16) // 16) + 1  # window + one block being filled
    assert engine.stats()["blocks_used"] == 0
    for p, r in zip(prompts, reqs):
        assert r.output_token_ids == policy_cache_greedy(llm.model, "window:size=24", llm.encode(p), params.max_tokens)


# ------------------------------------------------------------ quantized and tiered


@pytest.mark.parametrize("policy, exact_tail", [
    ("quantized:bits=8,group_size=16,residual=16", 16),
    ("quantized:bits=4,group_size=16,residual=0,n_sink=4", 0),
    ("quantized:bits=2,group_size=8,residual=24", 24),
    ("quantized:bits=2,group_size=16,value_group_size=8,residual=8,n_sink=2,rotate=values,clip=mse", 8),
    ("quantized:bits=2,group_size=16,residual=16,n_sink=4,hi_keys=0,hi_values=1,hi_bits=8", 16),
    ("tiered:hot=16,warm_bits=4,warm=32,cold=disk,group_size=16", 16),
    ("tiered:hot=16,warm_bits=2,warm=32,cold=disk,group_size=16,hi_keys=1", 16),
    ("tiered:hot=16,warm_bits=2,warm=32,cold=drop,group_size=16", 16),
])
def test_quantized_stores_report_their_bytes_and_stay_close(tiny_llm, policy, exact_tail):
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 100)
    dense = feed(model, KVCache.for_model(model, 1, 16), ids, chunk=10)
    cache = SequenceCache(model, policy)
    ours = feed(model, cache, ids, chunk=10)
    store = cache.store
    assert store.tail.length <= exact_tail + store.group_size - 1
    assert store.num_quantized > 0 and store.num_quantized % store.group_size == 0
    assert cache.nbytes_used == expected_bytes(cache) < cache.seen * cache.bytes_per_token
    if "drop" not in policy:
        assert cache.length == cache.seen == len(ids)
        assert torch.isfinite(ours).all() and not torch.equal(ours, dense)
    if "disk" in policy:
        assert store.cold_length > 0 and cache.stats()["disk_bytes"] == store.disk_nbytes > 0
    if "drop" in policy:
        assert store.dropped > 0 and cache.length == len(ids) - store.dropped


@pytest.mark.parametrize("policy, exact", [("full:dtype=fp16", torch.float16),
                                           ("quantized:bits=8,group_size=16,residual=16,exact=bf16", torch.bfloat16)])
def test_exact_tokens_can_be_kept_in_a_smaller_dtype(tiny_llm, policy, exact):
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 60)
    dense = feed(model, KVCache.for_model(model, 1, 16), ids, chunk=10)
    cache = SequenceCache(model, policy)
    ours = feed(model, cache, ids, chunk=10)
    store = cache.store if cache.store.kind == "full" else cache.store.tail
    assert store.k[0].dtype == exact and not cache.spec.is_full  # layer 0's storage
    assert cache.nbytes_used == expected_bytes(cache) < 60 * cache.bytes_per_token
    assert ((ours - dense).abs().max() / dense.abs().max()).item() < 0.05


def test_fewer_bits_cost_more_logit_error(tiny_llm):
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 100)
    dense = feed(model, KVCache.for_model(model, 1, 16), ids, chunk=10)
    err = {}
    for bits in (8, 4, 2):
        ours = feed(model, SequenceCache(model, f"quantized:bits={bits},group_size=16,residual=16"), ids, chunk=10)
        err[bits] = ((ours - dense).abs().max() / dense.abs().max()).item()  # relative to the logit scale
    assert err[8] < 0.05 and err[8] < err[4] < err[2], err


def test_every_layer_at_hi_bits_is_the_uniform_cache(tiny_llm):
    """hi_keys / hi_values naming every layer give exactly the cache at hi_bits; naming some
    layers lands in between the two uniform caches."""
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 100)
    base = "group_size=16,residual=16,n_sink=0,clip=none,rotate=none"
    run = {p: feed(model, SequenceCache(model, f"quantized:{base},{p}"), ids, chunk=10)
           for p in ("bits=8", "bits=2", "bits=2,hi_keys=0/1,hi_values=0/1,hi_bits=8", "bits=2,hi_keys=0/1,hi_bits=8")}
    assert torch.equal(run["bits=8"], run["bits=2,hi_keys=0/1,hi_values=0/1,hi_bits=8"])
    err = {p: (x - run["bits=8"]).abs().max().item() for p, x in run.items()}
    assert 0 < err["bits=2,hi_keys=0/1,hi_bits=8"] < err["bits=2"], err


def test_tiered_disk_tier_reads_back_what_it_wrote(tiny_llm):
    """The cold tier holds the warm tier's dequantized tokens: a tiered cache with a disk
    tier and the same quantized cache without one see the same layer-0 K/V (up to fp16 on disk)."""
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 96)
    tiered = SequenceCache(model, "tiered:hot=16,warm_bits=8,warm=16,cold=disk,group_size=16")
    plain = SequenceCache(model, "quantized:bits=8,group_size=16,residual=16")
    feed(model, tiered, ids, chunk=8)
    feed(model, plain, ids, chunk=8)
    assert tiered.store.cold_length >= 48
    with torch.inference_mode():  # layer 0: its K/V do not depend on what the cache kept
        tk, tv = (t.clone() for t in tiered.store.read(0, 0))
        pk, pv = plain.store.read(0, 0)
        torch.testing.assert_close(tk, pk, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(tv, pv, rtol=2e-3, atol=2e-3)


def test_sinks_with_int8_stream_with_flat_memory(tiny_llm):
    model = tiny_llm.model
    stream = (text_ids(tiny_llm, 500) * 2)[:800]
    cache = SequenceCache(model, "sinks:n_sink=4,window=64+quantized:bits=8,group_size=16,residual=16")
    held = []
    with torch.inference_mode():
        feed(model, cache, stream[:32], chunk=32)
        for t in stream[32:]:
            logits = model.forward(StepInputs(torch.tensor([[t]]), None, cache.next_position, None), cache)
            assert torch.isfinite(logits).all()
            held.append(cache.nbytes_used)
    assert cache.seen == 800 > 3 * model.config.max_position_embeddings
    assert max(held[100:]) <= max(held[:200])  # flat: bounded by the window, not the stream
    assert cache.nbytes_used == expected_bytes(cache)


@pytest.mark.parametrize("policy", ["quantized:bits=8,group_size=16,residual=8,n_sink=2",
                                    "quantized:bits=4,group_size=32,residual=0",
                                    # min-max ranges: groups quantized during decode must come out the same in
                                    # both runs; a clipped range can flip on the last bits of its input
                                    "quantized:bits=2,group_size=16,residual=16,n_sink=0,exact=fp16,clip=none",
                                    "quantized:bits=2,group_size=16,residual=16,clip=none,rotate=values",
                                    "quantized:bits=2,group_size=16,residual=16,clip=none,hi_keys=0,hi_values=1",
                                    "tiered:hot=16,warm_bits=4,warm=32,cold=disk,group_size=16"])
def test_decode_from_codes_equals_dequantize_then_attend(tiny_llm, policy):
    """The fused decode path (scales folded into queries and probabilities) computes the
    same attention as dequantizing the history and calling SDPA."""
    model = tiny_llm.model
    ids = text_ids(tiny_llm, 110)
    logits = {}
    for fused in (True, False):
        cache = SequenceCache(model, policy)
        cache.fused_attention = fused
        feed(model, cache, ids[:80], chunk=40)
        out = []
        with torch.inference_mode():
            for t in ids[80:]:
                assert cache._fused == fused
                out.append(model.forward(StepInputs(torch.tensor([[t]]), None, cache.next_position, None), cache)[0])
        logits[fused] = torch.stack(out)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
