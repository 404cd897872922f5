"""The live cache view: the block map from the engine, its JSON, and the page in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from kvcache import SamplingParams
from kvcache.server.dashboard import CACHED, FREE, block_map
from tests.server.harness import MODEL_ID

OUT = Path(__file__).resolve().parents[2] / "out"
PROMPTS = ["Once upon a time there was a little robot who loved to read books about the stars",
           "The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun"]


def test_block_map_colours_blocks_by_owner(tiny_llm, one_torch_thread):
    engine = tiny_llm.engine
    reqs = [engine.add_request(tiny_llm.encode(p), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                               eos_ids=tiny_llm.eos_ids) for p in PROMPTS]
    for _ in range(3):
        engine.step()
    m = block_map(engine)
    assert [o["id"] for o in m["owners"]] == [r.request_id for r in reqs]
    for k, r in enumerate(reqs):
        table = engine.kv.block_table(r.request_id)
        assert m["owners"][k]["blocks"] == len(table) and all(m["cells"][b] == k for b in table)
    assert m["cells"].count(FREE) + m["cells"].count(CACHED) == engine.kv.num_free_blocks
    for r in reqs:
        engine.abort(r.request_id)
    assert all(c in (FREE, CACHED) for c in block_map(engine)["cells"])


def test_cache_blocks_json(server):
    body = {"model": MODEL_ID, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    assert httpx.post(server.v1 + "/completions", json=body).status_code == 200
    d = httpx.get(server.v1 + "/cache/blocks").json()
    assert len(d["cells"]) == d["blocks_total"] == d["stats"]["blocks_total"]
    assert d["cells"].count(CACHED) == d["stats"]["blocks_cached"] > 0
    assert d["history"] and "prefix hit rate" in d["summary"]


def _chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_dashboard_in_headless_chromium(server):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium: `make test` installs it with apt (scripts/ensure_chromium.sh); it could not here")
    for i in range(6):  # some traffic: a shared system prompt, so the prefix cache has hits
        messages = [{"role": "system", "content": PROMPTS[0]}, {"role": "user", "content": f"{PROMPTS[1]} {i}"}]
        body = {"model": MODEL_ID, "messages": messages, "max_tokens": 8, "temperature": 0}
        assert httpx.post(server.v1 + "/chat/completions", json=body).status_code == 200
    OUT.mkdir(exist_ok=True)
    shot = OUT / "dashboard.png"
    shot.unlink(missing_ok=True)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=4000", "--window-size=1200,900"]
    url = server.url + "/dashboard"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=90, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a blank page compresses far smaller
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=90).stdout
    assert 'data-ready="1"' in dom, dom[:2000]
    assert "prefix hit rate" in dom and f"/ {server.state.stats()['blocks_total']}" in dom
    assert '<div id="error"></div>' in dom  # no poll error shown
