"""kvcache.bench.record: the JSON record every benchmark writes (tiny inputs, no benchmark run)."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime, timezone

import pytest

from kvcache.bench import record
from kvcache.bench.common import cpu_info
from kvcache.errors import KVCacheError

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
GIT = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False}


def tiny_record(**kw) -> dict:
    fields = dict(threads=2, timings={"decode_tok_s": [10.0, 11.5]}, baseline_timings={"total_s": [1.0, float("nan")]},
                  results={"speedup": 1.5}, machine=cpu_info(CPUINFO), git=GIT, now=NOW)
    fields.update(kw)
    return record.build_record("bench_x", "python benchmarks/bench_x.py --threads 2", **fields)


def test_cpu_info_reads_the_model_cores_and_flags():
    info = cpu_info(CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+" and info["cores"] == 2
    assert all(info["flags"][f] for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile"))
    zen3 = cpu_info("processor : 0\nmodel name : AMD EPYC 7B13\nflags : fpu avx2 fma\n")
    assert zen3["flags"]["avx2"] and not zen3["flags"]["avx512f"] and not zen3["flags"]["amx_tile"]
    assert zen3["model"] == "AMD EPYC 7B13" and zen3["cores"] == 1


def test_record_holds_command_commit_date_cpu_threads_and_both_sides_timings():
    r = tiny_record()
    assert r["benchmark"] == "bench_x" and r["command"] == "python benchmarks/bench_x.py --threads 2"
    assert r["git"] == GIT and r["date"] == "2025-03-04T05:06:07Z" and r["threads"] == 2
    assert r["machine"]["model"].startswith("Intel") and r["machine"]["flags"]["amx_tile"] is True
    assert r["timings"] == {"decode_tok_s": [10.0, 11.5]}
    assert r["baseline_timings"] == {"total_s": [1.0, None]}  # NaN is not JSON: null
    assert r["results"] == {"speedup": 1.5} and r["versions"]["torch"]
    json.dumps(r, allow_nan=False)


def test_record_refuses_a_name_that_is_not_a_plain_word_and_timings_that_are_not_dicts():
    with pytest.raises(ValueError):
        record.build_record("../x", "cmd", threads=1, timings={}, baseline_timings={}, results={}, machine={}, git=GIT)
    with pytest.raises(TypeError):
        record.build_record("x", "cmd", threads=1, timings=[1.0], baseline_timings={}, results={}, machine={},
                            git=GIT)


def test_write_record_names_the_file_by_benchmark_date_and_commit_and_never_overwrites(tmp_path):
    r = tiny_record()
    first = record.write_record(r, tmp_path / "results")
    second = record.write_record(r, tmp_path / "results")
    assert first.name == "bench_x-20250304T050607Z-0123456789.json"
    assert second.name == "bench_x-20250304T050607Z-0123456789-2.json"
    assert json.loads(first.read_text()) == r == json.loads(second.read_text())
    dirty = record.write_record(tiny_record(git={"commit": None, "dirty": None}), tmp_path / "results")
    assert dirty.name == "bench_x-20250304T050607Z-nogit.json"
    assert record.record_name(tiny_record(git={**GIT, "dirty": True})).endswith("-0123456789+dirty")


def test_a_record_folder_that_cannot_be_made_is_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KVCacheError, match="Cannot create the record folder"):
        record.prepare_dir(blocker / "results")


def test_save_writes_nothing_when_recording_is_off_and_reports_the_path(tmp_path, capsys):
    fields = dict(threads=1, timings={}, baseline_timings={}, results={}, machine={}, git=GIT, now=NOW)
    assert record.save("bench_x", "kvcache", ["bench", "x"], None, **fields) is None
    path = record.save("bench_x", "kvcache", ["bench", "x", "--note", "a b"], tmp_path, **fields)
    assert json.loads(path.read_text())["command"] == "kvcache bench x --note 'a b'"
    assert f"record: {path}" in capsys.readouterr().err


def test_git_state_names_this_checkout_and_nothing_outside_one(tmp_path):
    state = record.git_state()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=record.__file__.rsplit("/", 1)[0])
    if head.returncode != 0:
        pytest.skip("the source is not a git checkout")
    assert state["commit"] == head.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", state["commit"])
    assert state["dirty"] in (True, False)
    assert record.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_record_flags_parse_and_check_the_folder(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    record.add_arguments(p)
    assert record.folder_from_args(p.parse_args(["--no-record"])) is None
    assert record.folder_from_args(p.parse_args(["--record-dir", str(tmp_path / "r")])) == tmp_path / "r"
    assert (tmp_path / "r").is_dir()
    assert p.parse_args([]).record_dir == "benchmarks/results"
