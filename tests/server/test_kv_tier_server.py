"""The shared KV tier behind the HTTP server: a restarted server answers a known prompt from the
tier (usage's cached_tokens), a dead tier fails no request, and /metrics counts both."""

from __future__ import annotations

import re

import httpx

from kvcache.bench.serve import free_port
from tests.server.harness import MODEL_ID, start_server, tiny_server_llm

PROMPT = "Once upon a time there was a little robot who loved to read books about the stars and the moon"


def complete(server) -> dict:
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    r = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_a_restarted_server_answers_from_the_disk_tier(tiny_model_dir, tmp_path, one_torch_thread):
    first = start_server(tiny_server_llm(tiny_model_dir, block_size=4, kv_tier=f"disk:{tmp_path}"))
    try:
        cold = complete(first)
        assert first.state.llm.kv_tier.flush()
        assert metric(first, "kvcache_kv_tier_writes_blocks_total") > 0
    finally:
        first.stop()
    second = start_server(tiny_server_llm(tiny_model_dir, block_size=4, kv_tier=f"disk:{tmp_path}"))
    try:
        warm = complete(second)
        prompt = warm["usage"]["prompt_tokens"]
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt - 1) // 4 * 4
        assert metric(second, "kvcache_kv_tier_hits_blocks_total") == (prompt - 1) // 4
        assert metric(second, "kvcache_kv_tier_stored_bytes") > 0
    finally:
        second.stop()


def test_a_dead_redis_fails_no_request_and_is_counted(tiny_model_dir, one_torch_thread):
    server = start_server(tiny_server_llm(tiny_model_dir, kv_tier=f"redis://127.0.0.1:{free_port()}",
                                          kv_tier_timeout_ms=100))
    try:
        assert complete(server)["usage"]["completion_tokens"] == 6
        assert metric(server, "kvcache_kv_tier_errors_total") >= 1
        assert metric(server, "kvcache_kv_tier_hits_blocks_total") == 0
    finally:
        server.stop()
