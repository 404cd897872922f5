"""Every benchmark writes its record: the throughput script (several policies in one run), the
decode comparison with transformers, and `kvcache bench cache` / `bench chat`, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark


def only_record(folder: Path) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


def test_throughput_compares_several_policies_in_one_run_and_records_each(tiny_model_dir, tmp_path):
    bench = load_benchmark("bench_throughput")
    policies = ["full", "window:size=32"]
    result = bench.main(["--model", str(tiny_model_dir), "--threads", "1", "--num-requests", "4",
                         "--max-prompt", "32", "--max-output", "8", "--kv-budget", "256KiB", "--repeats", "2",
                         "--kv-policy", policies[0], "--kv-policy", policies[1], "--skip-hf", "--skip-llamacpp",
                         "--prefix-requests", "2", "--prefix-tokens", "40", "--question-tokens", "5",
                         "--prefix-max-tokens", "2", "--record-dir", str(tmp_path)])
    assert [r["kv_policy"] for r in result["policies"]] == policies
    for r in result["policies"]:
        assert len(r["throughput"]["ours_batched"]["walls_s"]) == 2  # both repeats, interleaved over policies
        assert r["capacity"]["peak_running"] >= 1 and r["prefix_caching"]["on"]["requests"] == 2
    rec = only_record(tmp_path)
    assert rec["benchmark"] == "bench_throughput" and rec["threads"] == 1
    assert "--kv-policy window:size=32" in rec["command"]
    assert set(rec["timings"]) == set(policies)
    for p in policies:
        assert len(rec["timings"][p]["ours_batched_walls_s"]) == 2
        assert len(rec["timings"][p]["prefix_on_ttft_s"]) == 2
    assert rec["baseline_timings"] == {}  # both baselines skipped, and the results say so
    assert rec["results"]["skipped"]["hf"] == "--skip-hf"
    assert rec["results"]["policies"][1]["capacity"]["bytes_per_token"] > 0


def test_throughput_policy_list_splits_repeats_and_checks():
    bench = load_benchmark("bench_throughput")
    assert bench.policy_list(None) == ["full"]
    assert bench.policy_list(["full; window:size=64", "full"]) == ["full", "window:size=64"]
    from kvcache.errors import KVCacheError

    with pytest.raises(KVCacheError):
        bench.policy_list(["full;bogus"])
    with pytest.raises(KVCacheError):
        bench.policy_list([" ; "])


def test_vs_transformers_records_both_sides_repeats(tiny_model_dir, tmp_path):
    bench = load_benchmark("bench_vs_transformers")
    rows = bench.main(["--model", str(tiny_model_dir), "--threads", "1", "--prompt-tokens", "8", "--new-tokens", "3",
                       "--repeats", "2", "--dtypes", "float32", "--record-dir", str(tmp_path)])
    rec = only_record(tmp_path)
    assert rec["results"] == rows
    assert len(rec["timings"]["float32"]["decode_tok_s"]) == 2 and len(rec["timings"]["float32"]["ttft_s"]) == 2
    assert len(rec["baseline_timings"]["float32"]["total_s"]) == 2
    assert len(rec["baseline_timings"]["float32"]["prefill_s"]) == 2


def test_no_record_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_benchmark("bench_vs_transformers").main(["--model", str(tiny_model_dir), "--threads", "1", "--prompt-tokens", "8",
                                        "--new-tokens", "2", "--repeats", "1", "--dtypes", "float32", "--no-record"])
    assert not any(tmp_path.rglob("*.json"))


@pytest.mark.parametrize("bench, ours, theirs", [
    (["cache", "--positions", "8,16", "--repeats", "2", "--prompt-tokens", "8", "--new-tokens", "3"],
     "cached_step_ms", "uncached_step_ms"),
    (["chat", "--turns", "2", "--words", "5", "--reply-tokens", "2", "--repeats", "2"],
     "session_ttft_ms", "recompute_ttft_ms"),
])
def test_cli_bench_commands_write_a_record(tiny_model_dir, tmp_path, capsys, bench, ours, theirs):
    from kvcache.cli import main

    code = main(["bench", *bench, "--model", str(tiny_model_dir), "--threads", "1", "--json",
                 "--record-dir", str(tmp_path)])
    assert code == 0
    rec = only_record(tmp_path)
    assert rec["benchmark"] == f"bench_{bench[0]}" and rec["command"].startswith(f"kvcache bench {bench[0]} ")
    assert rec["timings"][ours] and rec["baseline_timings"][theirs]
    assert json.loads(capsys.readouterr().out.splitlines()[0])  # the results were printed first


def test_cli_bench_refuses_an_unwritable_record_folder_before_any_work(tiny_model_dir, tmp_path, capsys):
    from kvcache.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["bench", "chat", "--model", str(tiny_model_dir), "--record-dir", str(blocker / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot create the record folder" in err and "Traceback" not in err


@pytest.mark.parametrize("name, args, ours, theirs", [
    ("bench_paged_formats", ["--policies", "full;window:size=32", "--batch-sizes", "1,2", "--context", "16",
                             "--steps", "2", "--repeats", "2", "--kv-budget", "1MiB"],
     "window:size=32 batch 2", "full batch 1"),
    ("bench_sinks_stream", ["--policies", "full;sinks:n_sink=4,window=28", "--tokens", "40", "--segment", "20",
                            "--prompt-tokens", "8", "--kv-cache-memory", "4MiB"],
     "sinks:n_sink=4,window=28", "full"),
    ("bench_paged_needle", ["--policies", "full;evict:scorer=knorm,ratio=0.5", "--lengths", "96", "--depths", "0.5",
                            "--max-new-tokens", "4", "--kv-cache-memory", "4MiB"],
     "evict:scorer=knorm,ratio=0.5", "full"),
])
def test_policy_benchmarks_record_the_baseline_policy_apart(tiny_model_dir, tmp_path, name, args, ours, theirs):
    assert load_benchmark(name).main(["--model", str(tiny_model_dir), "--threads", "1", *args,
                            "--record-dir", str(tmp_path)]) == 0
    rec = only_record(tmp_path)
    assert rec["benchmark"] == name and rec["timings"][ours] and rec["baseline_timings"][theirs]
    assert theirs not in rec["timings"]


def test_quant_micro_benchmark_records_every_repeat(tmp_path):
    load_benchmark("bench_quant").main(["--tokens", "64", "--repeats", "2", "--record-dir", str(tmp_path)])
    rec = only_record(tmp_path)
    assert len(rec["timings"]["dequantize int4 channel"]) == 2 and len(rec["baseline_timings"]["copy"]) == 2
    assert set(rec["results"]["median_us"]) == set(rec["timings"]) | set(rec["baseline_timings"])
