"""benchmarks/gpu_check.py as a dry run on the CPU with the tiny model: every section runs and
the record holds its figures (the GPU run is the same code on CUDA)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_dry_run_writes_one_record(tiny_model_dir, tmp_path, capsys):
    argv = ["--device", "cpu", "--dtype", "float32", "--model", str(tiny_model_dir), "--prompt-tokens", "24",
            "--new-tokens", "4", "--repeats", "1", "--num-requests", "3", "--max-prompt", "32", "--max-output", "6",
            "--kv-cache-memory", "8MiB", "--hf-num-blocks", "8", "--record-dir", str(tmp_path)]
    results = gpu_check.main(argv)
    eq = results["equivalence"]
    assert eq["logits_within_2e-2"] and eq["max_abs_logit_diff"] < 1e-3 and eq["greedy_equal_up_to_near_ties"]
    assert eq["engine_logprob_max_abs_diff"] < 1e-3
    assert results["batch1"]["ours"]["decode_tok_s"] > 0 and results["workload"]["workload"]["num_requests"] == 3
    [path] = tmp_path.glob("gpu_check-*.json")
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "gpu_check" and rec["results"]["gpu"]["name"] == "cpu (dry run)"
    assert rec["baseline_timings"]["workload_wall_s"] > 0


@pytest.mark.parametrize("argv", [["--new-tokens", "1"], ["--dtype", "int3"], ["--num-requests", "0"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--no-record", *argv])
    assert exc.value.code == 2
