"""The kvpress baseline: its driver answers our needle cases in its own venv.

`benchmarks/kvpress_driver.py` (run by the kvpress venv's python) is called as

    PY benchmarks/kvpress_driver.py --cases cases.json --presses snapkv,knorm --ratios 0.5,0.75,0.875 --out r.json

and writes `[{"press", "ratio", "id", "output", "correct"}]`. We score `output` again with
our own rule (`needle.is_correct`), so both sides are judged the same way. A missing
python or driver is a printed note, not an error.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from kvcache.eval.needle import NeedleCase, is_correct

DRIVER = Path(__file__).resolve().parents[3] / "benchmarks" / "kvpress_driver.py"


def run_driver(python: str | None, cases_path: Path, presses, ratios, out_path: Path,
               log: Callable[[str], None] = print, timeout_s: float = 7200) -> list[dict] | None:
    """The driver's results, or None (with a note through `log`) when it cannot run."""
    if not python:
        log("kvpress baseline skipped: give --kvpress-python PATH (a venv with kvpress installed).")
        return None
    if not Path(python).exists():
        log(f"kvpress baseline skipped: {python} does not exist.")
        return None
    if not DRIVER.exists():
        log(f"kvpress baseline skipped: the driver {DRIVER} is not in this checkout.")
        return None
    cmd = [python, str(DRIVER), "--cases", str(cases_path), "--presses", ",".join(presses),
           "--ratios", ",".join(f"{r:g}" for r in ratios), "--out", str(out_path)]
    log("kvpress: " + " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"kvpress baseline skipped: the driver ran past {timeout_s:.0f} s.")
        return None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        log(f"kvpress baseline skipped: the driver exited with {done.returncode}: {tail[0]}")
        return None
    return json.loads(out_path.read_text())


def group(results: list[dict], cases: list[NeedleCase]) -> dict[tuple[str, float], list[dict]]:
    """(press, ratio) -> its answers, each re-scored with our rule (`correct`; theirs kept as `driver_correct`)."""
    answers = {c.id: c.answer for c in cases}
    out: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        if r.get("id") not in answers:
            continue
        a = {"id": r["id"], "output": r.get("output", ""), "driver_correct": r.get("correct"),
             "correct": is_correct(r.get("output", ""), answers[r["id"]])}
        out.setdefault((str(r["press"]), float(r["ratio"])), []).append(a)
    return out
