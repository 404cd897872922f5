"""benchmarks/bench_replicas.py: its arguments are checked before anything starts, and the disk
part runs end to end on the tiny model (two `kvcache serve` processes, no Ray)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_benchmark


@pytest.mark.parametrize("argv, sentence", [
    (["--parts", "routing,chaos"], "unknown part 'chaos'"),
    (["--parts", ","], "--parts is empty"),
    (["--clients", "0"], "--clients must be at least 1"),
    (["--prefix-tokens", "0"], "--prefix-tokens must be at least 1"),
    (["--shared-requests", "-1"], "--shared-requests must not be negative"),
    (["--shared-requests", "0", "--unrelated-requests", "0"], "the workload is empty"),
    (["--parts", "tier", "--replicas", "1"], "the tier part needs --replicas 2"),
    (["--start-timeout", "0"], "--start-timeout must be positive"),
    (["--parts", "faults", "--replicas", "1"], "the faults part needs --replicas 2"),
    (["--fault-seconds", "0"], "--fault-seconds must be positive"),
    (["--fault-clients", "0"], "--fault-clients must be at least 1"),
])
def test_bad_arguments_are_one_sentence_and_exit_2(argv, sentence, capsys):
    with pytest.raises(SystemExit) as exc:
        load_benchmark("bench_replicas").parse_args([*argv, "--no-record"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert sentence in err and "Traceback" not in err


def test_defaults_are_the_issues_workload():
    args = load_benchmark("bench_replicas").parse_args(["--no-record"])
    assert args.part_list == ["routing", "tier", "disk"] and args.record_folder is None
    assert (args.replicas, args.threads, args.prefixes, args.shared_requests, args.unrelated_requests,
            args.prefix_tokens, args.clients) == (2, 1, 4, 32, 32, 1024, 8)


def test_a_fault_run_counts_completed_failed_and_cut_streams():
    import httpx

    bench = load_benchmark("bench_replicas")
    args = bench.parse_args(["--parts", "faults", "--fault-prompt-tokens", "4", "--no-record"])
    token = 'data: {"choices": [{"text": "a"}]}\n\n'
    bodies = iter([(200, token * 3 + "data: [DONE]\n\n"),
                   (200, token + 'data: {"error": {"code": "replica_lost"}}\n\ndata: [DONE]\n\n'),
                   (503, '{"error": {"code": "replica_unavailable"}}')])

    def answer(request):
        status, body = next(bodies)
        return httpx.Response(status, text=body, headers={"content-type": "text/event-stream"})

    load = bench.StreamLoad(args, "http://test", bench.Corpus(list(range(100))))
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        load.requests = [load.one(client) for _ in range(3)]
    assert [r["outcome"] for r in load.requests] == ["completed", "cut", "failed"]
    assert [r["tokens"] for r in load.requests] == [3, 1, 0] and len(load.token_times) == 4
    counts = load.counts()
    assert (counts["completed"], counts["failed"], counts["cut"]) == (1, 1, 1) and "HTTP 503" in counts["errors"][0]


def test_the_workload_shares_exactly_the_prefixes():
    bench = load_benchmark("bench_replicas")
    args = bench.parse_args(["--prefixes", "2", "--shared-requests", "4", "--unrelated-requests", "3",
                             "--prefix-tokens", "5", "--suffix-tokens", "2", "--no-record"])
    reqs = bench.workload(args, bench.Corpus(list(range(1000))))
    assert len(reqs) == 7 and all(len(r["ids"]) == 7 for r in reqs)
    shared = [r for r in reqs if r["kind"] == "shared"]
    assert {tuple(r["ids"][:5]) for r in shared} == {(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)}
    firsts = [r["ids"][0] for r in reqs if r["kind"] == "unrelated"] + [r["ids"][5] for r in shared]
    assert len(set(firsts)) == len(firsts)  # nothing else is shared
    with pytest.raises(bench.KVCacheError, match="needs more"):
        bench.Corpus(list(range(10))).take(11)


def test_the_disk_part_reuses_blocks_across_a_restart(tiny_model_dir, capsys):
    out = load_benchmark("bench_replicas").main(["--model", str(tiny_model_dir), "--parts", "disk", "--prefix-tokens", "64",
                             "--max-tokens", "2", "--kv-cache-memory", "4MiB", "--no-record", "--json"])
    disk = out["disk"]
    assert disk["restarted"]["cached_tokens"] == 48 and disk["first"]["cached_tokens"] == 0  # (64 - 1) // 16 blocks
    assert disk["same_tokens"]
    b = disk["bytes"]
    assert b["files"] == 4 and b["exact"] and b["value_lengths"] == [b["block_bytes"] + b["header_bytes"]]
    assert b["block_bytes"] == 2 * 2 * 2 * 16 * 16 * 4  # K and V x layers x kv heads x tokens x head dim x fp32
    captured = capsys.readouterr()
    assert json.loads(captured.out)["disk"]["cached_fraction"] == 0.75
    assert "[disk tier, restarted] up in" in captured.err
