"""benchmarks/bench_decode_attention.py on a tiny pool: both paths run, agree, and are timed."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_benchmark


@pytest.mark.parametrize("dtype,tokens", [("float32", 40), ("bfloat16", 37)])  # 37: a partial block, masked
def test_native_and_torch_agree_and_are_timed(dtype, tokens, capsys, tmp_path):
    bench = load_benchmark("bench_decode_attention")
    out = bench.main(["--kv-budget", "8MiB", "--batch", "3", "--tokens", str(tokens), "--repeats", "2",
                      "--dtype", dtype, "--record-dir", str(tmp_path)])
    (path,) = tmp_path.glob("bench_decode_attention-*.json")
    rec = json.loads(path.read_text())
    assert all(len(runs) == 2 for runs in rec["baseline_timings"].values()) and rec["baseline_timings"]
    assert out["max_abs_diff"] < (1e-5 if dtype == "float32" else 2e-2)
    kernels = {r["kernel"] for r in out["rows"]}
    assert "torch (gather + SDPA)" in kernels
    assert all(r["ms_per_step"] > 0 and r["gbs"] > 0 for r in out["rows"])
    assert out["bytes_per_step"] == 3 * tokens * 2 * 30 * 3 * 64 * (4 if dtype == "float32" else 2)
    assert "decode attention" in capsys.readouterr().out


def test_a_batch_larger_than_the_pool_is_refused():
    with pytest.raises(SystemExit, match="blocks"):
        load_benchmark("bench_decode_attention").main(["--kv-budget", "1MiB", "--batch", "64", "--tokens", "1000", "--no-record"])
