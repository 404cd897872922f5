"""benchmarks/bench_guidellm.py: its arguments are checked before any server starts."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


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
        load_benchmark("bench_guidellm").parse_args(given)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_guidellm_statistics_are_read_from_its_report():
    s = {"successful": {"median": 120.0, "mean": 130.0, "count": 9, "percentiles": {"p95": 300.0}}}
    assert load_benchmark("bench_guidellm").stat({"time_to_first_token_ms": s}, "time_to_first_token_ms") == {
        "median": 120.0, "p95": 300.0, "mean": 130.0, "count": 9}
