"""benchmarks/bench_guidellm.py: its arguments are checked before any server starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_guidellm.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_guidellm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--streams", "0"], "--streams must be at least 1"),
    (["--seconds", "-5"], "--seconds must be at least 1"),
    (["--guidellm", "/nonexistent/guidellm"], "/nonexistent/guidellm does not exist; run: bash benchmarks/guidellm_setup.sh"),
])
def test_bad_arguments_are_one_sentence_and_exit_2(argv, message, capsys, tmp_path):
    fake = tmp_path / "guidellm"
    fake.write_text("")
    given = argv if "--guidellm" in argv else [*argv, "--guidellm", str(fake)]
    with pytest.raises(SystemExit) as exc:
        _bench().parse_args(given)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_guidellm_statistics_are_read_from_its_report():
    s = {"successful": {"median": 120.0, "mean": 130.0, "count": 9, "percentiles": {"p95": 300.0}}}
    assert _bench().stat({"time_to_first_token_ms": s}, "time_to_first_token_ms") == {
        "median": 120.0, "p95": 300.0, "mean": 130.0, "count": 9}
