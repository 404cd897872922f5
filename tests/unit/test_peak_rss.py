"""A benchmark process's peak RSS is its own, not the peak of the process that forked it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvcache.bench.common import peak_rss_bytes

COMMON = Path(__file__).resolve().parents[2] / "src" / "kvcache" / "bench" / "common.py"
CHILD = f"""
import importlib.util, json
spec = importlib.util.spec_from_file_location("common", {str(COMMON)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(json.dumps(m.peak_rss_bytes()))
"""


def test_a_child_reports_its_own_peak_not_its_parents():
    ballast = bytearray(300 << 20)  # 300 MB touched in this process
    ballast[::4096] = b"x" * len(ballast[::4096])
    parent = peak_rss_bytes()
    child = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                      check=True).stdout)
    assert parent > 300 << 20
    assert 0 < child < 100 << 20, (parent, child)  # a bare interpreter, not the parent's 300 MB
    del ballast
