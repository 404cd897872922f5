"""The K/V bytes the engine reports: the blocks each request really holds.

For every policy the paged engine runs, a request's `kv_cache_bytes` (at its last step) and
`stats()["kv_bytes_held"]` (every held block once) must equal the blocks found in the pool's
block tables times one block's bytes, measured from the storage tensors (float K/V, or codes
plus scales and zero points). Whole blocks count, a partly filled last one too; released window
blocks and an evicted prompt's old blocks do not. Policies paged blocks cannot hold report
what each request's own cache holds.
"""

from __future__ import annotations

import pytest

from kvcache.cache.manager import RELEASED
from kvcache.cache.paged_quant import PagedQuantizedStorage
from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.grammar import POLICY_PARAMS, parse_policy
from kvcache.cache.policies.scorers import SCORERS
from tests.helpers import greedy, paged_llm, random_requests

BS = 16
QUANT = "quantized:bits=4,group_size=8,key_axis=token,residual=0"  # blocks of codes + fp16 scales
PAGED_SCORERS = [name for name, s in SCORERS.items() if not s.ragged_layers]  # the rest keep a length per layer
PAGED = {
    "full": "full",
    "window": "window:size=64",
    "sinks": "sinks:n_sink=4,window=24",
    **{f"evict-{s}": f"evict:scorer={s},ratio=0.5,window=8" for s in PAGED_SCORERS},
    "quantized": QUANT,
    "window-quantized": "window:size=64+" + QUANT,
    "sinks-quantized": "sinks:n_sink=4,window=24+" + QUANT,
    **{f"evict-{s}-quantized": f"evict:scorer={s},ratio=0.5,window=8+" + QUANT for s in PAGED_SCORERS},
}
PER_REQUEST = {
    "kivi": "quantized:bits=4,group_size=16,residual=16",
    "tiered": "tiered:hot=16,warm_bits=4,warm=32,cold=drop,group_size=16",
    "evict-decode": "evict:scorer=h2o,budget=40,decode=true",
    **{f"evict-{s}": f"evict:scorer={s},ratio=0.5,window=8" for s in SCORERS if s not in PAGED_SCORERS},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


def workload(vocab: int):
    """8 greedy requests: half share a 32-id prefix (shared blocks); prompts 20-60 ids, 10-40 new."""
    return random_requests(vocab, 8, 3, 32, lambda i: i % 2, (20, 60), (10, 40))


def measured_block_bytes(storage) -> int:
    """One block's bytes, from the tensors behind the pool (its blocks and the null block)."""
    if isinstance(storage, PagedQuantizedStorage):
        tensors = [t for s in (storage.k, storage.v) for t in (s.codes, s.scale, s.zero)]
    else:
        tensors = [storage.k, storage.v]
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert total % (storage.num_blocks + 1) == 0
    return total // (storage.num_blocks + 1)


def test_the_list_holds_every_policy_the_paged_engine_runs():
    specs = [parse_policy(p) for p in PAGED.values()]
    assert all(paged_plan(s) is not None for s in specs)
    assert {s.selectors[0].params["scorer"] for s in specs if s.selectors and s.selectors[0].name == "evict"} \
        == set(PAGED_SCORERS)
    covered = {part.name for s in specs for part in (*s.selectors, s.store)}
    for name in POLICY_PARAMS:  # a policy missing here runs on per-request caches (tiered)
        assert name in covered or paged_plan(parse_policy(name)) is None, name
    assert all(paged_plan(parse_policy(p)) is None for p in PER_REQUEST.values())


@pytest.mark.parametrize("policy", PAGED.values(), ids=PAGED.keys())
def test_reported_bytes_are_the_blocks_each_request_holds(tiny_model_dir, policy):
    llm = paged_llm(tiny_model_dir, policy, blocks=16, max_num_batched_tokens=32)  # chunked, preempting
    engine = llm.engine
    kv, pool = engine.kv, engine.kv.pool
    block = measured_block_bytes(engine.storage)
    at_finish: dict[str, int] = {}

    def live(rid: str) -> list[int]:
        """The blocks in rid's table, each one referenced in the pool."""
        blocks = [b for b in kv.block_table(rid) if b != RELEASED]
        assert all(pool.blocks[b].ref_count > 0 for b in blocks)
        return blocks

    finish = engine.scheduler.finish

    def watched_finish(req):  # the blocks a request holds as it finishes, before they go back
        at_finish[req.request_id] = len(live(req.request_id)) * block
        finish(req)

    engine.scheduler.finish = watched_finish

    def check(_):
        held: set[int] = set()
        for req in engine.scheduler.running:
            blocks = live(req.request_id)
            assert req.kv_bytes == len(blocks) * block, req.request_id
            held.update(blocks)
        assert all(req.kv_bytes == 0 for req in engine.scheduler.waiting)  # preempted: nothing held
        assert len(held) == pool.num_used_blocks
        assert llm.stats()["kv_bytes_held"] == len(held) * block

    prompts, params = workload(llm.config.vocab_size)
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.run_to_completion(requests, on_step=check)
    assert engine.scheduler.num_preemptions > 0
    assert kv.prefix_hits > 0 or paged_plan(parse_policy(policy)).evict is not None  # scorers may refuse hits
    for r in requests:
        assert r.error is None
        assert r.to_output().metrics.kv_cache_bytes == at_finish[r.request_id] > 0
    assert llm.stats()["kv_bytes_held"] == 0


def test_a_64_token_window_over_200_new_tokens_reports_the_window_not_every_token(tiny_model_dir):
    llm = paged_llm(tiny_model_dir, "window:size=64", blocks=64)
    out = llm.generate([list(range(5, 14))], greedy(200))[0]  # a 9-id prompt
    computed = 9 + 200 - 1  # 208 tokens in the cache (the last sampled one is never fed)
    first_kept = (computed - 64) // BS * BS  # 144: the blocks before it went back
    held = -(-computed // BS) - first_kept // BS  # 4 blocks: the 64 tokens the window reads
    per_token = llm.engine_bytes_per_token
    assert out.metrics.kv_cache_bytes == held * measured_block_bytes(llm.engine.storage) == 64 * per_token
    assert out.metrics.kv_cache_bytes < computed * per_token // 3


@pytest.mark.parametrize("policy", PER_REQUEST.values(), ids=PER_REQUEST.keys())
def test_per_request_caches_report_what_their_cache_held(tiny_model_dir, policy):
    llm = paged_llm(tiny_model_dir, policy, blocks=4096, max_num_batched_tokens=32)
    engine = llm.engine
    at_forget: dict[str, int] = {}
    forget = engine.runner.forget

    def watched_forget(rid):  # what the cache held as the request finished
        at_forget.setdefault(rid, engine.runner.bytes_held(rid))
        forget(rid)

    engine.runner.forget = watched_forget
    prompts, params = workload(llm.config.vocab_size)
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.run_to_completion(requests)
    for r in requests:
        assert r.to_output().metrics.kv_cache_bytes == at_forget[r.request_id] > 0
