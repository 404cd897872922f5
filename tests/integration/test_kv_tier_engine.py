"""The shared KV tier under the engine, on the tiny random-weight Llama.

The backbone: a second engine (a new `LLM`: empty pool, nothing shared in memory) on the same
tier generates exactly the tokens an engine without a tier does, while computing fewer prompt
tokens (the fetched blocks). Every failure (a flipped byte, Redis down or hung, a full write
queue) keeps the tokens identical and is counted; another dtype or policy never hits.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvcache
from kvcache import SamplingParams
from kvcache.bench.serve import free_port
from tests.redis_server import SilentPort

BS = 4
PROMPTS = [
    "A key value cache stores the keys and values of every token so that the model does not compute them again",
    "Once upon a time there was a little robot who loved to read books about the stars, the moon and the deep",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


def make_llm(model_dir, **kw) -> kvcache.LLM:
    kw.setdefault("dtype", "float32")
    return kvcache.LLM(str(model_dir), device="cpu", progress=False, kv_cache_memory="4MiB", block_size=BS, **kw)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """What an engine without a tier generates, and how many prompt tokens it computes."""
    llm = make_llm(tiny_model_dir)
    outs = llm.generate(PROMPTS, GREEDY)
    return [o.token_ids for o in outs], llm.stats()["tokens_prefilled"]


def full_blocks(llm, prompt: str) -> int:
    return (len(llm.encode(prompt)) - 1) // BS


def warm_then_reuse(model_dir, tier_url: str, **kw):
    """Engine A computes the prompts into the tier; a fresh engine B generates them again."""
    a = make_llm(model_dir, kv_tier=tier_url, **kw)
    a.generate(PROMPTS, GREEDY)
    assert a.kv_tier.flush()
    b = make_llm(model_dir, kv_tier=tier_url, **kw)
    return a, b, [o.token_ids for o in b.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("backend", ["disk", "redis"])
def test_a_fresh_engine_on_the_tier_makes_the_same_tokens_computing_fewer(request, tiny_model_dir, tmp_path,
                                                                          plain, backend):
    url = f"disk:{tmp_path}" if backend == "disk" else request.getfixturevalue("redis_url")
    a, b, tokens = warm_then_reuse(tiny_model_dir, url)
    ref_tokens, ref_prefilled = plain
    assert tokens == ref_tokens
    fetched = sum(full_blocks(b, p) for p in PROMPTS)
    s = b.stats()
    assert s["kv_tier_hits"] == fetched > 0 and s["kv_tier_errors"] == 0
    assert s["kv_tier_tokens_fetched"] == fetched * BS
    assert s["tokens_prefilled"] == ref_prefilled - fetched * BS
    assert a.stats()["kv_tier_writes"] >= fetched
    # the tier's bytes: every value is one block's K and V plus a fixed header, exactly
    if backend == "disk":
        files = list(tmp_path.glob("*.kvb"))
        assert sum(f.stat().st_size for f in files) == len(files) * a.kv_tier.value_bytes
        assert s["kv_tier_stored_bytes"] == len(files) * a.kv_tier.value_bytes


def test_a_flipped_byte_on_disk_is_a_miss_with_the_same_tokens(tiny_model_dir, tmp_path, plain, caplog):
    a = make_llm(tiny_model_dir, kv_tier=f"disk:{tmp_path}")
    a.generate(PROMPTS, GREEDY)
    a.kv_tier.flush()
    b = make_llm(tiny_model_dir, kv_tier=f"disk:{tmp_path}")
    ids = b.encode(PROMPTS[0])
    third = b.kv_tier.key(b.engine.kv.block_hashes(ids, 3)[2])  # the prompt's third block
    path = tmp_path / f"{third}.kvb"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kvcache.tier"):
        tokens = [o.token_ids for o in b.generate(PROMPTS, GREEDY)]
    assert tokens == plain[0]
    s = b.stats()
    assert s["kv_tier_errors_by_kind"] == {"corrupt": 1}
    assert s["kv_tier_hits"] == 2 + full_blocks(b, PROMPTS[1])  # the run stops before the bad block
    assert len([r for r in caplog.records if r.name == "kvcache.tier"]) == 1


def test_a_flipped_byte_in_redis_is_a_miss_with_the_same_tokens(tiny_model_dir, redis_server, redis_url, plain):
    a = make_llm(tiny_model_dir, kv_tier=redis_url)
    a.generate(PROMPTS, GREEDY)
    a.kv_tier.flush()
    first = a.kv_tier.key(a.engine.kv.block_hashes(a.encode(PROMPTS[0]), 1)[0])
    client = redis_server.client()
    byte = client.getrange(first, 500, 500)
    client.setrange(first, 500, bytes([byte[0] ^ 0x01]))
    b = make_llm(tiny_model_dir, kv_tier=redis_url)
    assert [o.token_ids for o in b.generate(PROMPTS, GREEDY)] == plain[0]
    s = b.stats()
    assert s["kv_tier_errors_by_kind"] == {"corrupt": 1} and s["kv_tier_hits"] == full_blocks(b, PROMPTS[1])


@pytest.mark.parametrize("failure", ["closed port", "hung server"])
def test_redis_down_or_hung_is_a_miss_with_the_same_tokens(tiny_model_dir, plain, caplog, failure):
    silent = SilentPort() if failure == "hung server" else None
    url = silent.url if silent else f"redis://127.0.0.1:{free_port()}"
    try:
        llm = make_llm(tiny_model_dir, kv_tier=url, kv_tier_timeout_ms=100)
        with caplog.at_level(logging.WARNING, logger="kvcache.tier"):
            tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
            llm.kv_tier.flush()
    finally:
        if silent:
            silent.close()
    assert tokens == plain[0]
    s = llm.stats()
    kind = "timeout" if silent else "unreachable"
    assert s["kv_tier_hits"] == 0 and s["kv_tier_errors_by_kind"].get(kind, 0) >= 1
    assert set(s["kv_tier_errors_by_kind"]) == {kind}
    assert len([r for r in caplog.records if r.name == "kvcache.tier"]) == 1  # logged once


def test_redis_stopped_mid_run_is_a_miss_with_the_same_tokens(tiny_model_dir, tmp_path, plain, caplog):
    """The engine's connection to Redis was open and used; the server stops; serving goes on."""
    from kvcache.bench.redis_server import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path).start()
    try:
        llm = make_llm(tiny_model_dir, kv_tier=server.url, kv_tier_timeout_ms=100)
        llm.generate(PROMPTS[:1], GREEDY)
        assert llm.kv_tier.flush() and llm.stats()["kv_tier_writes"] > 0
    finally:
        server.stop()
    llm.engine.kv.reset_prefix_cache()
    with caplog.at_level(logging.WARNING, logger="kvcache.tier"):
        t0 = time.monotonic()
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert llm.kv_tier.flush()
        elapsed = time.monotonic() - t0
    assert tokens == plain[0]
    s = llm.stats()
    assert s["kv_tier_hits"] == 0 and s["kv_tier_errors_by_kind"].get("unreachable", 0) >= 1
    assert set(s["kv_tier_errors_by_kind"]) == {"unreachable"}
    assert len([r for r in caplog.records if r.name == "kvcache.tier"]) == 1  # logged once
    assert elapsed < 5.0  # one failed lookup, then the tier rests: no step waits on it


def test_a_full_write_queue_drops_writes_and_never_changes_tokens(tiny_model_dir, tmp_path, plain, monkeypatch):
    llm = make_llm(tiny_model_dir, kv_tier=f"disk:{tmp_path}", kv_tier_queue=1)
    backend = llm.kv_tier.backend
    import threading

    gate = threading.Event()
    real_put = backend.put
    monkeypatch.setattr(backend, "put", lambda key, value: (gate.wait(), real_put(key, value)))
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == plain[0]
    gate.set()
    llm.kv_tier.flush()
    s = llm.stats()
    assert s["kv_tier_dropped_writes"] > 0
    assert s["kv_tier_writes"] <= 2  # the one the writer held and the one queued behind it


@pytest.mark.parametrize("other", [{"dtype": "bfloat16"}, {"kv_policy": "window:size=64"}])
def test_another_fingerprint_never_hits(tiny_model_dir, tmp_path, other):
    a = make_llm(tiny_model_dir, kv_tier=f"disk:{tmp_path}")
    a.generate(PROMPTS, GREEDY)
    a.kv_tier.flush()
    assert list(tmp_path.glob("*.kvb"))
    b = make_llm(tiny_model_dir, kv_tier=f"disk:{tmp_path}", **other)
    assert b.kv_tier.fingerprint != a.kv_tier.fingerprint
    b.generate(PROMPTS, GREEDY)
    s = b.stats()
    assert s["kv_tier_hits"] == 0 and s["kv_tier_lookups"] == len(PROMPTS) and s["kv_tier_errors"] == 0


def test_policies_whose_blocks_are_not_float_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(kvcache.KVCacheError, match="float paged blocks"):
        make_llm(tiny_model_dir, kv_tier=f"disk:{tmp_path}", kv_policy="quantized:bits=8,key_axis=token,residual=0")
    with pytest.raises(kvcache.KVCacheError, match="prefix caching"):
        make_llm(tiny_model_dir, kv_tier=f"disk:{tmp_path}", enable_prefix_caching=False)


def test_the_disk_tier_survives_a_restart_of_the_cli(tiny_model_dir, tmp_path):
    """Two `kvcache generate` processes on one disk tier: the second reuses the first's blocks."""
    env = {**os.environ, "PYTHONPATH": str(Path(kvcache.__file__).parents[1])}
    cmd = [sys.executable, "-m", "kvcache.cli", "generate", "--model", str(tiny_model_dir), "--prompt", PROMPTS[0],
           "--max-tokens", "8", "--json", "--threads", "1", "--kv-tier", f"disk:{tmp_path}",
           "--kv-tier-max-bytes", "4MiB"]
    runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout)
            for _ in range(2)]
    assert runs[0]["token_ids"] == runs[1]["token_ids"]
    assert runs[0]["metrics"]["cached_prompt_tokens"] == 0
    prompt = runs[1]["metrics"]["prompt_tokens"]
    assert runs[1]["metrics"]["cached_prompt_tokens"] == (prompt - 1) // 16 * 16 > 0


def test_bad_tier_flags_exit_2_with_one_sentence(tiny_model_dir, tmp_path):
    from kvcache.cli import main

    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-tokens", "2"]
    assert main(base + ["--kv-tier", "ftp://x"]) == 2
    assert main(base + ["--kv-tier-max-bytes", "1GiB"]) == 2
    assert main(base + ["--kv-tier", f"disk:{tmp_path}", "--kv-tier-max-bytes", "lots"]) == 2
