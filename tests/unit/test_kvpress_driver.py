"""benchmarks/kvpress_driver.py: the parts that run without kvpress (it lives in .venv-kvpress)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import imported_top_modules, load_benchmark

DRIVER = Path(__file__).resolve().parents[2] / "benchmarks" / "kvpress_driver.py"


@pytest.fixture(scope="module")
def driver():
    return load_benchmark("kvpress_driver")


def test_driver_never_imports_kvcache():
    assert "kvcache" not in imported_top_modules(DRIVER)


def test_arguments(driver, tmp_path):
    args = driver.parse_args(["--cases", "c.json", "--out", "r.json", "--presses", "none,snapkv,knorm",
                              "--ratios", "0.5,0.75"])
    assert args.presses == ["none", "snapkv", "knorm"] and args.ratios == [0.5, 0.75]
    assert driver.runs(args.presses, args.ratios) == [
        ("none", 0.0), ("snapkv", 0.5), ("snapkv", 0.75), ("knorm", 0.5), ("knorm", 0.75)]
    for bad in (["--presses", "h2o"], ["--ratios", "1.5"], ["--ratios", "x"], ["--max-new-tokens", "0"]):
        with pytest.raises(SystemExit):
            driver.parse_args(["--cases", "c.json", "--out", "r.json", *bad])


def test_cases_file_is_checked(driver, tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps({"model_dir": "m", "template": "t", "cases": [{"id": "a", "context": "c"}]}))
    with pytest.raises(SystemExit, match="question, answer"):
        driver.load_cases(path)
