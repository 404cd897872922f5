"""Unit tests for the continuous-batching `Scheduler` (no model: the engine's bookkeeping is simulated).

`simulate_step` does what `LLMEngine.step` does around the model: after `schedule()` it
marks each chunk's tokens computed, registers full blocks for prefix reuse, appends a fake
sampled token to chunks that reach their sequence's end and finishes requests that are done.
"""

from __future__ import annotations

import random
import time
import zlib

import pytest

from kvcache.cache.manager import KVCacheManager
from kvcache.engine.detokenizer import IncrementalDetokenizer
from kvcache.engine.request import Request, Status
from kvcache.engine.sampling import Sampler, SamplingParams
from kvcache.engine.scheduler import Scheduler, SchedulerOutput

FAKE_TOKEN = 7


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def make_request(rid: str, prompt: list[int] | int, max_tokens: int = 4, max_total: int = 100_000) -> Request:
    """A greedy request; an int prompt means that many distinct ids (no accidental prefix sharing)."""
    if isinstance(prompt, int):
        base = 1000 * (zlib.crc32(rid.encode()) % 100_000 + 1)
        prompt = [base + j for j in range(prompt)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(rid, list(prompt), params, Sampler(params), IncrementalDetokenizer(FakeTokenizer()), max_total)


def make_scheduler(num_blocks: int, block_size: int = 4, prefix: bool = True, max_num_seqs: int = 64,
                   max_num_batched_tokens: int = 512) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size, prefix), max_num_seqs, max_num_batched_tokens)


def simulate_step(sched: Scheduler, token: int = FAKE_TOKEN) -> SchedulerOutput:
    """One engine step without a model; checks the step's basic contract on the way."""
    out = sched.schedule()
    now = time.perf_counter()
    assert out.num_tokens <= sched.token_budget
    assert len({c.request.request_id for c in out.chunks}) == len(out.chunks), "a request scheduled twice"
    assert len(sched.running) <= sched.max_num_seqs
    for c in out.chunks:
        req = c.request
        assert c.num_tokens >= 1 and c.start == req.num_computed_tokens
        assert c.start + c.num_tokens <= req.num_tokens
        assert len(sched.kv.block_table(req.request_id)) * sched.kv.block_size >= c.start + c.num_tokens
    for r in out.failed:
        assert r.finished and r.finish_reason == "error" and r.error and r.request_id not in sched.kv
    for c in out.chunks:
        req = c.request
        samples = c.sampled = c.samples  # recorded: .samples changes once a token is appended
        req.num_computed_tokens += c.num_tokens
        sched.kv.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        if samples:
            req.append_token(token, now)
            if req.finish_reason is not None:
                sched.finish(req)
    sched.kv.pool.check_invariants()
    assert sched.kv.num_seqs == len(sched.running)
    for r in sched.waiting:
        assert r.request_id not in sched.kv and r.status == Status.WAITING
    return out


def run_all(sched: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_work():
        simulate_step(sched)
        steps += 1
        assert steps < max_steps, "the scheduler does not make progress"
    return steps


def ids(reqs) -> list[str]:
    return [r.request_id for r in reqs]


# -- continuous batching / FCFS ---------------------------------------------------------


def test_admits_waiting_requests_as_blocks_allow_in_fcfs_order():
    sched = make_scheduler(num_blocks=10)
    a, b = make_request("a", 16, max_tokens=1), make_request("b", 20, max_tokens=10)
    c, d = make_request("c", 8, max_tokens=2), make_request("d", 3, max_tokens=2)
    for r in (a, b, c, d):
        sched.add(r)
    out = simulate_step(sched)
    # a (4 blocks) + b (5 blocks) leave 1 free: c (2 blocks) waits, and d (1 block) must not overtake it
    assert [(ch.request.request_id, ch.start, ch.num_tokens) for ch in out.chunks] == [("a", 0, 16), ("b", 0, 20)]
    assert ids(sched.waiting) == ["c", "d"] and "d" not in sched.kv
    assert a.finished and a.request_id not in sched.kv  # a generated its only token
    out = simulate_step(sched)
    assert [(ch.request.request_id, ch.num_tokens) for ch in out.chunks] == [("b", 1), ("c", 8), ("d", 3)]
    assert ids(sched.running) == ["b", "c", "d"] and not sched.waiting
    run_all(sched)
    assert [len(r.output_token_ids) for r in (a, b, c, d)] == [1, 10, 2, 2]
    assert sched.kv.pool.num_used_blocks == 0


def test_new_requests_join_a_running_batch():
    sched = make_scheduler(num_blocks=64)
    a = make_request("a", 5, max_tokens=6)
    sched.add(a)
    simulate_step(sched)
    simulate_step(sched)
    b = make_request("b", 7, max_tokens=3)
    sched.add(b)
    out = simulate_step(sched)
    assert [(ch.request.request_id, ch.num_tokens) for ch in out.chunks] == [("a", 1), ("b", 7)]
    run_all(sched)
    assert len(a.output_token_ids) == 6 and len(b.output_token_ids) == 3


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(num_blocks=100, max_num_seqs=2)
    reqs = [make_request(f"r{i}", 3 + i, max_tokens=3) for i in range(5)]
    for r in reqs:
        sched.add(r)
    out = simulate_step(sched)
    assert ids(c.request for c in out.chunks) == ["r0", "r1"] and ids(sched.waiting) == ["r2", "r3", "r4"]
    admitted: list[str] = []
    while sched.has_work():
        out = simulate_step(sched)
        assert len(out.chunks) <= 2
        admitted += [c.request.request_id for c in out.chunks if c.start == 0]
    assert admitted == ["r2", "r3", "r4"]  # FCFS as seats free up
    assert all(len(r.output_token_ids) == 3 for r in reqs)


# -- chunked prefill / token budget ---------------------------------------------------


def test_chunked_prefill_keeps_decodes_going():
    sched = make_scheduler(num_blocks=200, max_num_batched_tokens=32)
    dec = make_request("dec", 5, max_tokens=50)
    sched.add(dec)
    simulate_step(sched)  # dec's prompt, first token
    long = make_request("long", 100, max_tokens=3)
    sched.add(long)
    chunks_of_long = []
    while not long.output_token_ids:
        n_dec = len(dec.output_token_ids)
        out = simulate_step(sched)
        assert out.num_tokens <= 32
        by_id = {c.request.request_id: c for c in out.chunks}
        assert by_id["dec"].num_tokens == 1 and len(dec.output_token_ids) == n_dec + 1  # one token every step
        ch = by_id["long"]
        chunks_of_long.append((ch.start, ch.num_tokens, ch.sampled))
    assert len(chunks_of_long) == 4  # 31 + 31 + 31 + 7
    assert [n for _, n, _ in chunks_of_long] == [31, 31, 31, 7]
    starts = [s for s, _, _ in chunks_of_long]
    assert starts == [0, 31, 62, 93]  # contiguous
    assert [s for *_, s in chunks_of_long] == [False, False, False, True]  # samples only at the end
    run_all(sched)
    assert len(long.output_token_ids) == 3 and len(dec.output_token_ids) == 50


def test_two_long_prompts_share_the_budget_in_order():
    sched = make_scheduler(num_blocks=200, max_num_batched_tokens=32)
    p, q = make_request("p", 50, max_tokens=2), make_request("q", 50, max_tokens=2)
    sched.add(p)
    sched.add(q)
    out = simulate_step(sched)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("p", 0, 32)]
    out = simulate_step(sched)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("p", 32, 18), ("q", 0, 14)]
    run_all(sched)
    assert p.output_token_ids and q.output_token_ids


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_respects_budget_seats_blocks_and_fcfs(seed):
    """Random arrivals on a tight pool: every step checks the budget, the seat cap, the tables
    and the pool's invariants; admissions follow arrival order; all finish, nothing leaks."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    num_blocks = rng.randint(8, 24)
    cap = num_blocks * bs
    sched = make_scheduler(num_blocks, bs, prefix=rng.random() < 0.7, max_num_seqs=rng.randint(1, 8),
                           max_num_batched_tokens=rng.randint(4, 48))
    shared = [rng.randint(1, 50) for _ in range(3 * bs)]
    reqs, first_admitted = [], []
    for i in range(40):
        if rng.random() < 0.1:  # can never fit the pool
            r = make_request(f"big{i}", cap + rng.randint(0, 10), max_tokens=2)
        else:
            n = rng.randint(1, cap // 2)
            prompt = (shared[: rng.randint(0, len(shared))] + [rng.randint(1, 50) for _ in range(n)])[:n]
            r = make_request(f"r{i}", prompt, max_tokens=rng.randint(1, max(1, cap - n - 2)))
        reqs.append(r)
    pending = list(reqs)
    steps = hits = queries = 0
    while pending or sched.has_work():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        was_waiting = {id(r) for r in sched.waiting}
        out = simulate_step(sched)
        for c in out.chunks:  # admissions (first or after a preemption) start at their prefix hits
            if id(c.request) in was_waiting:
                hits, queries = hits + c.start, queries + c.request.num_tokens - (c.sampled and 1)
        first_admitted += [c.request.request_id for c in out.chunks if c.request.request_id not in first_admitted]
        for r in out.preempted:
            assert r.num_computed_tokens == 0 and r.request_id not in sched.kv
        steps += 1
        assert steps < 20_000
    for r in reqs:
        assert r.finished
        if r.request_id.startswith("big"):
            assert r.finish_reason == "error" and "pool" in r.error and not r.output_token_ids
        else:
            assert r.error is None and len(r.output_token_ids) == r.params.max_tokens, r
    usage = sched.kv.usage()
    assert (usage["prefix_hits"], usage["prefix_queries"]) == (hits, queries)  # counted once per admission
    ok = [r.request_id for r in reqs if not r.request_id.startswith("big")]
    assert first_admitted == ok  # FCFS
    assert sched.kv.pool.num_used_blocks == 0 and sched.kv.num_seqs == 0
    assert not sched.running and not sched.waiting


# -- preemption -----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preemption_frees_the_newest_and_resumes_it_first(prefix):
    sched = make_scheduler(num_blocks=8, prefix=prefix)  # 32 token slots
    a, b = make_request("a", 12, max_tokens=12), make_request("b", 12, max_tokens=6)
    sched.add(a)
    sched.add(b)
    simulate_step(sched)  # both prefilled: 3 + 3 blocks, one token each
    c = make_request("c", 20, max_tokens=2)  # 5 blocks: has to wait
    sched.add(c)
    preempted_out = None
    while preempted_out is None:
        out = simulate_step(sched)
        assert out.chunks, "a step with work did nothing"
        if out.preempted:
            preempted_out = out
    # a and b reached 17 tokens: a (older) takes the last free block, b (newer) is preempted
    assert ids(preempted_out.preempted) == ["b"]
    assert ids(c.request for c in preempted_out.chunks) == ["a"]
    assert b.status == Status.WAITING and b.num_computed_tokens == 0 and b.request_id not in sched.kv
    assert b.preemptions == 1 and sched.num_preemptions == 1
    assert ids(sched.waiting) == ["b", "c"]  # at the head, ahead of the later arrival
    assert ids(sched.running) == ["a"]
    n_out_b = len(b.output_token_ids)
    assert n_out_b == 5  # its generated tokens are kept, to be recomputed
    # b resumes before c once blocks free up, recomputing its whole sequence (minus prefix hits)
    resumed = None
    while resumed is None:
        out = simulate_step(sched)
        assert "c" not in ids(ch.request for ch in out.chunks) or resumed
        resumed = next((ch for ch in out.chunks if ch.request is b), None)
    if prefix:
        assert resumed.start > 0 and resumed.start % 4 == 0  # its own cached blocks were hit
    else:
        assert resumed.start == 0
    assert resumed.start + resumed.num_tokens == 12 + n_out_b and resumed.sampled
    run_all(sched)
    assert [len(r.output_token_ids) for r in (a, b, c)] == [12, 6, 2]
    assert all(r.error is None for r in (a, b, c))
    assert sched.kv.pool.num_used_blocks == 0


def test_preemption_takes_the_newest_of_several():
    sched = make_scheduler(num_blocks=6, prefix=False)  # 24 slots
    reqs = [make_request(f"r{i}", 4, max_tokens=10) for i in range(4)]  # 1 block each at first
    for r in reqs:
        sched.add(r)
    victims = []
    while sched.has_work():
        out = simulate_step(sched)
        victims += ids(out.preempted)
        if victims:
            break
    assert victims[0] == "r3"
    run_all(sched)
    assert all(len(r.output_token_ids) == 10 for r in reqs)
    assert sched.num_preemptions == sum(r.preemptions for r in reqs) >= 1


# -- requests that cannot fit ---------------------------------------------------------


def test_request_longer_than_the_pool_fails_alone():
    sched = make_scheduler(num_blocks=4)  # 16 slots
    big = make_request("big", 20, max_tokens=2)
    exact = make_request("exact", 16, max_tokens=2)  # 16 + the slot for its next token > 16
    small = make_request("small", 5, max_tokens=3)
    for r in (big, exact, small):
        sched.add(r)
    out = simulate_step(sched)
    assert ids(out.failed) == ["big", "exact"]
    assert ids(c.request for c in out.chunks) == ["small"]
    for r in (big, exact):
        assert r.finished and r.finish_reason == "error" and not r.output_token_ids
        assert "pool holds 16" in r.error and "needs" in r.error
        out_obj = r.to_output()
        assert out_obj.error == r.error and out_obj.finish_reason == "error"
    run_all(sched)
    assert len(small.output_token_ids) == 3 and small.error is None
    assert sched.kv.pool.num_used_blocks == 0


def test_request_outgrowing_the_pool_fails_and_others_finish():
    """A prompt that fits but whose generation outgrows the whole pool preempts the others,
    then fails alone with an error in that same step (never an empty step); the others resume."""
    sched = make_scheduler(num_blocks=4, prefix=False)  # 16 slots
    grow = make_request("grow", 10, max_tokens=20)
    other = make_request("other", 3, max_tokens=12)
    sched.add(grow)
    sched.add(other)
    empty_steps = 0
    while sched.has_work():
        out = simulate_step(sched)
        empty_steps += not out.chunks and not out.failed
    assert grow.finish_reason == "error" and grow.error and 0 < len(grow.output_token_ids) < 20
    assert other.error is None and len(other.output_token_ids) == 12
    assert sched.kv.pool.num_used_blocks == 0
    # every step either scheduled work or failed a request: no step without progress
    assert empty_steps == 0


# -- finish / abort -------------------------------------------------------------------


def test_finish_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=10)
    a, b, c = make_request("a", 9, max_tokens=50), make_request("b", 5, max_tokens=50), make_request("c", 24, 2)
    for r in (a, b, c):
        sched.add(r)
    simulate_step(sched)
    assert ids(sched.running) == ["a", "b"] and ids(sched.waiting) == ["c"]
    used = sched.kv.pool.num_used_blocks
    sched.finish(a)
    assert a.finished and a.request_id not in sched.kv and ids(sched.running) == ["b"]
    assert sched.kv.pool.num_used_blocks == used - 3
    sched.finish(c)  # a waiting request holds no blocks; it just leaves the queue
    assert c.finished and not sched.waiting
    sched.finish(b)
    assert not sched.has_work() and sched.kv.pool.num_used_blocks == 0
    sched.kv.pool.check_invariants()


# -- prefix caching -------------------------------------------------------------------


@pytest.mark.parametrize("first_done", [False, True], ids=["first-running", "first-finished"])
def test_prefix_hits_are_admitted_as_computed(first_done):
    sched = make_scheduler(num_blocks=32)
    prefix = list(range(100, 112))  # 3 full blocks
    a = make_request("a", prefix + [1, 2, 3], max_tokens=1 if first_done else 10)
    sched.add(a)
    simulate_step(sched)
    assert a.finished == first_done
    queries_before = sched.kv.usage()["prefix_queries"]
    b = make_request("b", prefix + [4, 5, 6, 7, 8], max_tokens=3)
    sched.add(b)
    out = simulate_step(sched)
    ch = next(c for c in out.chunks if c.request is b)
    assert (ch.start, ch.num_tokens) == (12, 5)
    assert b.num_cached_tokens == 12 and b.to_output().metrics.cached_prompt_tokens == 12
    usage = sched.kv.usage()
    assert usage["prefix_hits"] == 12
    assert usage["prefix_queries"] - queries_before == len(b.prompt_token_ids)
    if not first_done:
        assert sched.kv.block_table("b")[:3] == sched.kv.block_table("a")[:3]  # shared blocks
    run_all(sched)
    assert len(b.output_token_ids) == 3 and sched.kv.pool.num_used_blocks == 0


def test_identical_prompt_leaves_one_token_to_compute():
    sched = make_scheduler(num_blocks=32)
    prompt = list(range(200, 212))  # exactly 3 blocks
    a, b = make_request("a", prompt, max_tokens=1), make_request("b", prompt, max_tokens=1)
    sched.add(a)
    simulate_step(sched)
    sched.add(b)
    out = simulate_step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(8, 4)]  # 2 blocks hit; the 3rd holds the last token
    assert b.num_cached_tokens == 8


def test_no_prefix_hits_when_disabled():
    sched = make_scheduler(num_blocks=32, prefix=False)
    prompt = list(range(300, 316))
    a, b = make_request("a", prompt, max_tokens=1), make_request("b", prompt + [1], max_tokens=1)
    sched.add(a)
    simulate_step(sched)
    sched.add(b)
    out = simulate_step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 17)]
    assert b.num_cached_tokens == 0 and sched.kv.usage()["prefix_hits"] == 0


def test_blocked_queue_head_counts_its_prefix_hits_once():
    sched = make_scheduler(num_blocks=8)  # 32 slots
    prefix = list(range(100, 112))
    a = make_request("a", prefix + [1], max_tokens=1)
    sched.add(a)
    simulate_step(sched)  # a's 3 full blocks stay cached after it finishes
    x = make_request("x", 16, max_tokens=8)
    b = make_request("b", prefix + [2, 3, 4, 5, 6], max_tokens=2)
    sched.add(x)
    sched.add(b)
    blocked = 0
    while b.num_cached_tokens < 0:
        simulate_step(sched)
        blocked += b.num_cached_tokens < 0
    assert blocked >= 2  # b was retried (and its hits looked up) while x held the blocks
    assert b.num_cached_tokens > 0
    usage = sched.kv.usage()
    assert usage["prefix_hits"] == b.num_cached_tokens
    assert usage["prefix_queries"] == 13 + 16 + 17
    run_all(sched)


# -- per-request policy caches: fixed prefill pieces, reserved slots ----------------------


@pytest.mark.parametrize("seed", range(4))
def test_prefill_pieces_end_at_multiples_and_outputs_go_one_at_a_time(seed):
    """With `prefill_piece`, every prompt chunk ends at a multiple of it or at the prompt's end
    however the budget is shared, recomputed outputs after a preemption go one token a step,
    and every request still finishes."""
    rng = random.Random(seed)
    sched = Scheduler(KVCacheManager(16, 4, False), 8, 24, prefill_piece=8)
    reqs = [make_request(f"r{i}", rng.randint(1, 40), rng.randint(1, 12)) for i in range(12)]
    for r in reqs:
        sched.add(r)
    steps = 0
    while sched.has_work():
        out = simulate_step(sched)
        for c in out.chunks:
            end, prompt = c.start + c.num_tokens, len(c.request.prompt_token_ids)
            if c.start < prompt:
                assert end == prompt or end % 8 == 0, (c.start, end, prompt)
            else:
                assert c.num_tokens == 1
        steps += 1
        assert steps < 10_000
    assert sched.num_preemptions > 0 and all(r.finished and r.error is None for r in reqs)


def test_slots_for_grants_blocks_by_cost_and_a_request_that_cannot_fit_its_cost_fails():
    """With `slots_for` a sequence is granted the slots its cost needs (here 3 a token), not
    one a token: it waits for them, is admitted by them, and fails alone when the pool cannot
    hold its cost, though its tokens alone would fit."""
    sched = Scheduler(KVCacheManager(7, 4, False), 8, 64, slots_for=lambda n: 3 * n)
    a, b = make_request("a", 5, 3), make_request("b", 5, 3)
    sched.add(a)
    sched.add(b)
    simulate_step(sched)
    assert len(sched.kv.block_table("a")) == 4  # 15 slots for its 5 tokens
    assert sched.kv.num_free_blocks == 3 and sched.waiting[0] is b  # b needs 4 blocks: it waits
    run_all(sched)
    assert a.error is None and b.error is None and sched.kv.num_free_blocks == 7
    big = make_request("big", 9, 1)  # 10 tokens fit 28 slots; 30 slots do not
    sched.add(big)
    run_all(sched)
    assert big.finish_reason == "error"
