"""benchmarks/bench_decode_spread.py: its variance split and summary, on made-up measurements."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.fixture
def bench():
    return load_benchmark("bench_decode_spread")


def rows(value):
    return [{"round": r, "process": p, "decode_tok_s": value(r, p)} for r in range(4) for p in range(3)]


def test_variance_lies_where_the_values_change(bench):
    by_round = bench.variance_shares(rows(lambda r, p: 100 + 10 * r))
    assert by_round["between_rounds"] == pytest.approx(1) and by_round["between_processes"] == pytest.approx(0)
    by_process = bench.variance_shares(rows(lambda r, p: 100 + 7 * p))
    assert by_process["between_processes"] == pytest.approx(1) and by_process["between_rounds"] == pytest.approx(0)
    both = bench.variance_shares(rows(lambda r, p: 100 + 10 * r + 7 * p))
    assert both["left"] == pytest.approx(0, abs=1e-9)
    assert both["between_rounds"] + both["between_processes"] == pytest.approx(1)
    assert bench.variance_shares(rows(lambda r, p: 50.0)) == {"between_rounds": 0.0, "between_processes": 0.0,
                                                              "left": 0.0}


def test_a_fresh_process_is_compared_with_its_own_round(bench):
    args = bench.parse_args(["--together", "3", "--rounds", "4", "--variants", "gguf", "--no-record"])
    live = {"gguf:bfloat16": rows(lambda r, p: 100.0 * (r + 1))}  # round r's live median: 100 (r + 1)
    fresh = {"gguf:bfloat16": [{"round": r, "decode_tok_s": 90.0 * (r + 1)} for r in range(4)]}
    s = bench.summarize(args, live, fresh)["gguf:bfloat16"]
    assert s["fresh_over_its_round"]["min"] == pytest.approx(0.9) == s["fresh_over_its_round"]["max"]
    assert s["live_round_medians"]["max_over_min"] == pytest.approx(4)
    assert s["live_process_medians"]["max_over_min"] == pytest.approx(1)


def test_variants_name_their_dtype_and_huge_pages(bench):
    args = bench.parse_args(["--variants", "gguf,none:float32@thp,gguf@thp,llamacpp,llamacpp@nommap", "--no-record"])
    assert args.variant_list == ["gguf:bfloat16", "none:float32@thp", "gguf:bfloat16@thp", "llamacpp",
                                 "llamacpp@nommap"]
    for bad in (["--rounds", "0"], ["--variants", "llamacpp@thp"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args([*bad, "--no-record"])
        assert exit_info.value.code == 2
