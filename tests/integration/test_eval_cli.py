"""`kvcache eval` on the tiny model: the documented JSON fields, files written, exit 2 on bad flags."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_cli import run_cli

FIELDS = {"policy", "kind", "bytes_per_token", "bytes_per_token_seen", "compression_ratio", "compression_vs_dense",
          "perplexity", "perplexity_by_context", "needle_accuracy", "needle_by_length", "decode_tok_s",
          "tokens_seen", "tokens_held", "kv_bytes", "note"}
SMALL = ["--contexts", "64,128", "--needle-lengths", "96", "--needle-depths", "0.5", "--speed-context", "128",
         "--speed-steps", "2", "--speed-repeats", "1", "--threads", "1"]


def test_eval_json_has_the_documented_fields(tiny_model_dir, tmp_path):
    r = run_cli("eval", "--model", str(tiny_model_dir), "--policies", "full; full:dtype=fp16; window:size=32", *SMALL,
                "--baselines", "hf", "--out", str(tmp_path), "--json", "--record-dir", str(tmp_path / "records"))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    (path,) = (tmp_path / "records").glob("eval-*.json")  # the run's record: every repeat, ours and theirs
    rec = json.loads(path.read_text())
    assert rec["results"] == rows and len(rec["timings"]["window:size=32"]["decode_tok_s"]) == 1
    assert len(rec["baseline_timings"]["hf:dynamic"]["decode_tok_s"]) == 1
    by = {row["policy"]: row for row in rows}
    assert ["full", "full:dtype=fp16", "window:size=32"] == [row["policy"] for row in rows[:3]]
    for row in rows:
        assert FIELDS <= set(row)
    full, win = by["full"], by["window:size=32"]
    assert set(full["perplexity_by_context"]) == {"64", "128"}
    assert full["perplexity"] == full["perplexity_by_context"]["128"]
    assert full["compression_ratio"] == pytest.approx(0.5) and full["compression_vs_dense"] == pytest.approx(1.0)
    assert full["tokens_seen"] == full["tokens_held"] == 128
    assert by["full:dtype=fp16"]["compression_ratio"] == pytest.approx(1.0)
    assert win["tokens_held"] < 128 and win["compression_ratio"] > 1.0
    assert win["bytes_per_token_seen"] < win["bytes_per_token"] == full["bytes_per_token"]
    for row in (full, win):
        assert 0.0 <= row["needle_accuracy"] <= 1.0 and row["decode_tok_s"] > 0
    hf = [row for row in rows if row["kind"] == "hf"]
    assert hf[0]["policy"] == "hf:dynamic" and hf[0]["decode_tok_s"] > 0
    assert hf[1]["decode_tok_s"] is not None or hf[1]["note"]  # no quantization backend: a note says so
    for name in ("results.md", "results.json", "perplexity.png", "needle.png", "needle_cases.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| window:size=32 |" in (tmp_path / "results.md").read_text()
    assert "kvpress" not in r.stderr


def test_eval_skip_flags_leave_their_fields_empty(tiny_model_dir, tmp_path):
    r = run_cli("eval", "--model", str(tiny_model_dir), "--policies", "evict:scorer=knorm,ratio=0.5;quantized:bits=4",
                "--contexts", "64", "--skip-needle", "--skip-speed", "--baselines", "none", "--no-plots",
                "--threads", "1", "--out", str(tmp_path), "--json", "--no-record")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["needle_accuracy"] is None and rows[0]["decode_tok_s"] is None
    assert rows[0]["compression_ratio"] == pytest.approx(1.0, rel=0.1)  # fp32 at half the tokens
    assert len(rows) == 2
    assert rows[1]["perplexity"] is not None  # int4 ran (all 64 tokens still in its exact tail)


def test_eval_stream_mode(tiny_model_dir, tmp_path):
    r = run_cli("eval", "--model", str(tiny_model_dir), "--stream-tokens", "300",
                "--stream-policies", "sinks:n_sink=4,window=60", "--chunk", "16", "--threads", "1",
                "--out", str(tmp_path), "--json", "--record-dir", str(tmp_path / "records"))
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert len(list((tmp_path / "records").glob("eval_stream-*.json"))) == 1
    assert row["policy"] == "sinks:n_sink=4,window=60" and row["tokens"] == 300
    assert row["ppl_first"] > 0 and row["ppl_last"] > 0 and row["kv_bytes_after_fill"][1] <= row["kv_bytes_max"]
    assert (tmp_path / "stream.png").stat().st_size > 0


@pytest.mark.parametrize("args", [
    ["--contexts", "a,b"],
    ["--contexts", "1"],
    ["--policies", "bogus"],
    ["--policies", " ; "],
    ["--policies", "evict:scorer=h2o"],
    ["--needle-depths", "1.5"],
    ["--needle-lengths", "10"],
    ["--baselines", "vllm"],
    ["--speed-context", "x"],
    ["--speed-steps", "0"],
    ["--stream-tokens", "2"],
    ["--contexts", "100000"],
    ["--policies", "quantized:bits=2,hi_keys=5"],  # the tiny model has layers 0 and 1
])
def test_bad_eval_flags_are_one_sentence_and_exit_2(tiny_model_dir, args, capsys):
    from kvcache.cli import main

    try:  # in-process: argparse mistakes raise SystemExit(2), ours return 2
        code = main(["eval", "--model", str(tiny_model_dir), "--threads", "1", "--out", "/nonexistent", "--no-record",
                     *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err


def test_default_rows_naming_missing_layers_are_skipped_with_a_notice(tiny_llm):
    from kvcache.cli_eval import _fit_policies
    from kvcache.eval.sweep import DEFAULT_POLICIES, SweepConfig

    mixed = [p for p in DEFAULT_POLICIES if "hi_keys" in p]
    assert mixed  # the default rows include a mixed-width policy for the default model's 30 layers
    cfg = SweepConfig(policies=["full", *mixed, "quantized:bits=2,hi_keys=1"])
    notices = []
    _fit_policies(tiny_llm, cfg, named=False, log=notices.append)
    assert cfg.policies == ["full", "quantized:bits=2,hi_keys=1"]
    assert len(notices) == len(mixed) and "layers are 0 to 1" in notices[0]
