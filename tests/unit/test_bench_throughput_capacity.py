"""benchmarks/bench_throughput.py's capacity run on a tiny model: requests carry the output cap
as max_tokens and end at their workload length as if at EOS; the schedule is the one the
engine runs when told every length up front (it never reads max_tokens before the end)."""

from __future__ import annotations


from rich.progress import Progress

from tests.helpers import load_benchmark, paged_llm


def test_capacity_run_ends_requests_at_their_length_and_matches_the_told_schedule(tiny_model_dir):
    bench = load_benchmark("bench_throughput")
    llm = paged_llm(tiny_model_dir, "full", blocks=7, block_size=4, max_num_batched_tokens=16)
    corpus = list(range(3, 400))
    wl = bench.make_workload(corpus, 8, seed=1, pmin=4, pmax=12, omin=4, omax=10)
    with Progress(disable=True) as progress:
        cap, records = bench.run_capacity(llm, wl, output_cap=10, progress=progress)
        # the same requests told their lengths (max_tokens = length, the oracle's knowledge)
        told, told_records = bench.run_capacity(llm, wl, output_cap=0, progress=progress)
    assert [r.running for r in records] == [r.running for r in told_records]
    assert [r.blocks_used for r in records] == [r.blocks_used for r in told_records]
    assert cap["peak_running"] == told["peak_running"] >= 2
    assert records[-1].generated == sum(wl.outputs)  # nobody ran past its length
    assert cap["preemptions"] > 0  # the small pool forced some, and the schedules still agree
    usage = llm.engine.kv.usage()
    assert usage["blocks_used"] == 0  # every ended request gave its blocks back
