"""The paged engine over quantized blocks (policy `quantized:...,key_axis=token,residual=0`).

Every token is quantized when written and read back dequantized, its own step included,
so a request's tokens do not depend on batching, chunking, preemption or prefix hits:
batched greedy output must equal each request alone, and equal `SequenceCache` running the
same policy one sequence at a time.
"""

from __future__ import annotations


import pytest
import torch

import kvcache
from kvcache import SamplingParams
from kvcache.cache.paged_quant import PagedQuantizedStorage, TokenQuantFormat
from kvcache.cache.policies.cache import SequenceCache
from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.quant import dequantize, quantize
from kvcache.cache.spec import KVFormat, kv_tensor_bytes
from kvcache.errors import KVCacheError
from tests.helpers import policy_cache_greedy, random_requests

BS = 4
POLICIES = ["quantized:bits=8,key_axis=token,residual=0",
            "quantized:bits=4,group_size=8,key_axis=token,residual=0",
            "quantized:bits=2,group_size=8,key_axis=token,residual=0",
            "quantized:bits=4,key_bits=8,group_size=8,key_axis=token,residual=0"]  # 8-bit keys, 4-bit values
IDS = ["int8", "int4", "int2", "k8v4"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


def make_llm(tiny_model_dir, policy: str, num_blocks: int | None = None, **kw) -> kvcache.LLM:
    probe = kvcache.LLM(str(tiny_model_dir), progress=False, kv_policy=policy, kv_cache_memory=1 << 20)
    mem = None if num_blocks is None else num_blocks * BS * probe.engine_bytes_per_token
    return kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, kv_policy=policy,
                       kv_cache_memory=mem if mem is not None else 1 << 20, block_size=BS, **kw)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def workload(vocab: int, n: int = 12) -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy requests: half share a 10-id prefix, prompts 3-30 ids, 4-20 new tokens."""
    return random_requests(vocab, n, 7, 10, lambda i: i % 2, (3, 20), (4, 20))


def test_grammar_says_which_quantized_policies_run_paged():
    assert paged_plan(parse_policy(POLICIES[0])) is not None
    assert paged_plan(parse_policy("window:size=64+" + POLICIES[1])).window == 64
    assert paged_plan(parse_policy("sinks:n_sink=4,window=60+" + POLICIES[0])).sinks == (4, 60)
    for policy in ("quantized:bits=8", "quantized:bits=8,key_axis=token",  # residual 128 by default
                   "quantized:bits=8,key_axis=token,residual=0,n_sink=4",
                   "evict:ratio=0.5,decode=true+" + POLICIES[0], POLICIES[2] + ",hi_keys=0"):  # one width per pool
        assert paged_plan(parse_policy(policy)) is None, policy
    with pytest.raises(KVCacheError, match="key_axis must be one of channel, token"):
        parse_policy("quantized:key_axis=head")
    with pytest.raises(KVCacheError, match="key_bits must be one of 0, 8, 4, 2"):
        parse_policy("quantized:key_bits=3")
    with pytest.raises(KVCacheError, match="hi_bits"):  # 4-bit layers over 8-bit keys would be narrower
        parse_policy("quantized:bits=2,key_bits=8,hi_keys=1")


@pytest.mark.parametrize("bits,group,key_bits", [(8, 16, 0), (4, 8, 0), (2, 8, 0), (4, 8, 8)])
def test_storage_round_trips_tokens_like_quantize_and_counts_spec_bytes(bits, group, key_bits):
    L, H, D, nb = 2, 2, 16, 6
    fmt = TokenQuantFormat(bits, group, group, clip=bits == 2, rotate_values=bits == 2, key_bits=key_bits)
    st = PagedQuantizedStorage(L, nb, BS, H, D, torch.float32, "cpu", fmt)
    kb = key_bits or bits
    per_layer = sum(kv_tensor_bytes(KVFormat.parse(f"int{b}", group), 1, H, D, "token") for b in (kb, bits))
    assert st.bytes_per_token == fmt.bytes_per_token(L, H, D) == L * per_layer
    assert st.nbytes == nb * BS * st.bytes_per_token
    torch.manual_seed(0)
    k, v = torch.randn(2, 1, H, 7, D), torch.randn(2, 1, H, 7, D)  # (L, 1, H, T, D)
    table = [3, 1]  # tokens 0-3 in block 3, 4-6 in block 1
    slots = torch.tensor([table[i // BS] * BS + i % BS for i in range(7)])
    st.zero_blocks(table)
    for layer in range(L):
        st.scatter(layer, slots, k[layer], v[layer])
    for layer in range(L):
        rk, rv = st.read_rows(layer, torch.tensor([table]))  # (1, H, 8, D)
        want_k = dequantize(quantize(k[layer], kb, group, "token", fmt.clip))
        assert torch.equal(rk[:, :, :7], want_k)
        assert (rv[:, :, :7] - v[layer]).abs().max() < (0.02 if bits == 8 else 1.5)
        assert torch.equal(rk[:, :, 7], torch.zeros(1, H, D))  # a zeroed, never written slot
        lo_k, _ = st.read_range(layer, 3 * BS, 4 * BS)  # block 3 as one range
        assert torch.equal(lo_k, rk[:, :, :4])
    with pytest.raises(KVCacheError, match="quantized"):
        st.read_blocks(table, 7)


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_batched_with_preemption_and_prefix_hits_equals_alone(tiny_model_dir, policy):
    llm = make_llm(tiny_model_dir, policy, num_blocks=20, max_num_batched_tokens=16)
    assert isinstance(llm.engine.storage, PagedQuantizedStorage)
    prompts, params = workload(llm.config.vocab_size)
    outs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["preemptions"] > 0 and stats["prefix_hits"] > 0
    alone = make_llm(tiny_model_dir, policy, enable_prefix_caching=False)
    for prompt, p, out in zip(prompts, params, outs):
        assert out.error is None and len(out.token_ids) == p.max_tokens
        assert out.token_ids == alone.generate([prompt], p)[0].token_ids
    assert stats["kv_bytes_total"] == 20 * BS * llm.engine_bytes_per_token
    assert llm.stats()["blocks_used"] == 0


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_engine_equals_policy_cache_and_differs_from_float(tiny_model_dir, tiny_llm, policy):
    llm = make_llm(tiny_model_dir, policy)
    model = llm.model
    prompts, params = workload(llm.config.vocab_size, n=4)
    outs = llm.generate(prompts, params)
    changed = 0
    for prompt, p, out in zip(prompts, params, outs):
        assert p.greedy and p.ignore_eos
        assert out.token_ids == policy_cache_greedy(model, policy, prompt, p.max_tokens)
        changed += out.token_ids != tiny_llm.generate([prompt], p)[0].token_ids
    if "bits=2" in policy:
        assert changed > 0  # 2-bit K/V change a random model's choices: the codes are really used


def test_per_token_policy_cache_holds_codes_and_reports_their_bytes(tiny_llm):
    cache = SequenceCache(tiny_llm.model, POLICIES[1])
    store = cache.store
    ids = torch.tensor([list(range(3, 23))])
    from kvcache.models.step import StepInputs

    tiny_llm.model.forward(StepInputs(ids, None, 0, None), cache)
    assert store.num_quantized == 20 and store.tail.length == 0
    c = tiny_llm.config
    fmt = TokenQuantFormat.from_policy(parse_policy(POLICIES[1]), c.head_dim)
    assert cache.nbytes_used == 20 * fmt.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim)


def test_per_token_keys_with_a_wider_layer_read_each_layer_at_its_width(tiny_llm):
    """hi_keys with per-token keys (run per sequence, the staged tokens quantized per layer):
    layer 0's keys hold 4-bit codes (up to 16 levels a group), layer 1's 2-bit ones (4)."""
    policy = POLICIES[2] + ",hi_keys=0,rotate=none"
    cache = SequenceCache(tiny_llm.model, policy)
    from kvcache.models.step import StepInputs

    ids = torch.tensor([list(range(3, 19))])
    logits = tiny_llm.model.forward(StepInputs(ids, None, 0, None), cache)
    assert torch.isfinite(logits).all()
    assert [cache.store.qk.view(i).bits for i in range(2)] == [4, 2]

    def most_levels(layer: int) -> int:  # distinct values in any (head, token, 8-channel group)
        k, _ = cache.store.read(layer, 0)  # (1, Hkv, 16, D) dequantized
        groups = k.reshape(-1, 8)
        return max(len(set(g.tolist())) for g in groups)

    assert most_levels(1) <= 4 < most_levels(0) <= 16
