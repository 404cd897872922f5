"""Saving and restoring conversations' KV caches: the file format, the API, the CLI chat."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import httpx
import pytest
import torch

import kvcache
from kvcache import KVCacheError, SamplingParams
from kvcache.cache.dense import KVCache
from kvcache.cache.snapshot import CacheFingerprint, KVSnapshot, SnapshotError, load_snapshot, save_snapshot
from kvcache.engine.persist import SessionStore, check_session_name, fingerprint
from kvcache.models.step import StepInputs
from tests.server.harness import MODEL_ID, start_server, tiny_server_llm

HISTORY = [{"role": "system", "content": "You are a small robot who loves books about the stars."},
           {"role": "user", "content": "Tell me a story about the moon, the deep blue sea and the library."},
           {"role": "assistant", "content": "Once upon a time there was a little robot who loved to read books."},
           {"role": "user", "content": "What did the librarian say?"}]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
FP = CacheFingerprint("m", "abc", "float32", "")


def _snap(n=20, layers=2, heads=2, dim=4, fp=FP) -> KVSnapshot:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(layers, heads, n, dim, generator=g)
    return KVSnapshot(fp, list(range(n)), k, -k, [{"role": "user", "content": "hi"}])


# -- the file format ----------------------------------------------------------------------
def test_snapshot_round_trip(tmp_path):
    snap = _snap()
    size = save_snapshot(tmp_path / "a.safetensors", snap)
    got = load_snapshot(tmp_path / "a.safetensors", FP, (2, 2, 4))
    assert size == (tmp_path / "a.safetensors").stat().st_size
    assert got.token_ids == snap.token_ids and got.messages == snap.messages and got.fingerprint == FP
    assert torch.equal(got.k, snap.k) and torch.equal(got.v, snap.v)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:5], "truncated"),
    (lambda b: b[:-3] + bytes([b[-3] ^ 0xFF]) + b[-2:], "checksum"),
    (lambda b: b"\xff" * 8 + b[8:], "truncated or corrupt"),
    (lambda b: b"", "truncated"),
])
def test_damaged_files_are_refused(tmp_path, damage, message):
    path = tmp_path / "s.safetensors"
    save_snapshot(path, _snap())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message):
        load_snapshot(path, FP)


def test_foreign_or_misshapen_snapshots_are_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    save_snapshot(path, _snap())
    for other, what in [(dataclasses.replace(FP, model="n"), "model"), (dataclasses.replace(FP, dtype="bfloat16"),
                        "dtype"), (dataclasses.replace(FP, policy="window:size=8"), "policy"),
                        (dataclasses.replace(FP, config_hash="zzz"), "model config"),
                        (dataclasses.replace(FP, weights="int8(digits=2,calibration=nearest)"), "weights' quantization")]:
        with pytest.raises(SnapshotError, match=f"its {what} differs"):
            load_snapshot(path, other)
    with pytest.raises(SnapshotError, match="shape"):
        load_snapshot(path, FP, (3, 2, 4))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SnapshotError, match="not a kvcache session"):
        load_snapshot(tmp_path / "other.safetensors")


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 65, "a b", "a.b", "~root"])
def test_session_names_are_validated(name):
    with pytest.raises(KVCacheError, match="Invalid session name"):
        check_session_name(name)


# -- the CLI chat: its session on the engine ------------------------------------------------------
def _fresh_llm(model_dir, **kw) -> kvcache.LLM:
    """An LLM of its own: an engine whose prefix cache holds nothing yet."""
    return kvcache.LLM(str(model_dir), dtype="float32", device="cpu", progress=False, **kw)


def test_chat_session_save_and_load_continue_the_conversation(tiny_model_dir, tmp_path, one_torch_thread):
    """A chat saves the full blocks of its conversation from the engine's prefix cache (the
    server's session path); loaded on another engine, the next turn equals the same turn on
    the engine that computed them, from as many cached tokens."""
    llm = _fresh_llm(tiny_model_dir)
    store = SessionStore(tmp_path, llm)
    a = llm.session(system="You are terse.")
    a.send("Tell me a story about the robot.", GREEDY)
    snap = a.snapshot()
    assert snap.num_tokens == len(a.token_ids) // 16 * 16 > 0 and snap.token_ids == a.token_ids[: snap.num_tokens]
    assert snap.messages == a.messages
    store.save("story", snap)
    llm.engine.kv.reset_prefix_cache()  # blocks the cache let go are computed again to save them
    again = a.snapshot()
    assert again.token_ids == snap.token_ids
    torch.testing.assert_close(again.k, snap.k, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.v, snap.v, atol=1e-5, rtol=0)
    want = a.send("And then?", GREEDY)

    other = _fresh_llm(tiny_model_dir)
    b = other.session()
    b.restore(SessionStore(tmp_path, other).load("story"))
    assert b.messages == a.messages[:3] and b.turns == 1
    assert b.stats()["cached_tokens"] == snap.num_tokens
    got = b.send("And then?", GREEDY)
    assert got.token_ids == want.token_ids
    assert got.metrics.cached_prompt_tokens == want.metrics.cached_prompt_tokens > 0
    assert [i.name for i in store.list()] == ["story"] and store.list()[0].compatible


def test_chat_file_in_the_old_dense_format_still_loads(tiny_model_dir, tmp_path, one_torch_thread):
    """Chats used to be saved from a dense cache: every token it had computed (the prompt and
    the reply but its last token, rarely a whole number of blocks) with their K/V as
    (layers, kv_heads, tokens, head_dim) read off that cache, and the messages. Such a file
    loads: its full blocks go into the prefix cache, the partial last one is computed again."""
    llm = _fresh_llm(tiny_model_dir)
    a = llm.session(system="You are terse.")
    a.send("Tell me a story about the robot.", GREEDY)
    ids = a.token_ids
    assert len(ids) % 16 and len(ids) > 16
    cache = KVCache.for_model(llm.model, 1, len(ids))  # the old writer: a dense cache over those tokens
    with torch.inference_mode():
        llm.model.forward(StepInputs(torch.tensor([ids]), None, 0, None), cache)
    old = KVSnapshot(fingerprint(llm), list(ids), cache.k[:, 0, :, : len(ids)].clone(),
                     cache.v[:, 0, :, : len(ids)].clone(), list(a.messages))
    SessionStore(tmp_path, llm).save("old", old)
    want = a.send("And then?", GREEDY)

    other = _fresh_llm(tiny_model_dir)
    b = other.session()
    b.restore(SessionStore(tmp_path, other).load("old"))
    assert b.messages == a.messages[:3] and b.stats()["cached_tokens"] == len(ids) // 16 * 16
    got = b.send("And then?", GREEDY)
    assert got.token_ids == want.token_ids
    assert got.metrics.cached_prompt_tokens == want.metrics.cached_prompt_tokens > 0


@pytest.mark.parametrize("policy", ["quantized:bits=8,key_axis=token,residual=0",
                                    "quantized:bits=4,group_size=16,residual=16"])
def test_chat_over_blocks_that_hold_no_float_kv_refuses_to_save_or_load(tiny_model_dir, policy, one_torch_thread):
    llm = _fresh_llm(tiny_model_dir, kv_policy=policy)
    s = llm.session(system="You are terse.")
    s.send("Tell me a story about the robot.", GREEDY)
    messages = list(s.messages)
    for call in (s.snapshot, lambda: s.restore(_snap(32, llm.config.num_layers, llm.config.num_kv_heads,
                                                     llm.config.head_dim, fingerprint(llm)))):
        with pytest.raises(KVCacheError, match="float KV blocks"):
            call()
    assert s.messages == messages  # a refused load leaves the conversation as it was


def test_chat_repl_save_and_load(tiny_model_dir, tmp_path):
    args = [sys.executable, "-m", "kvcache.cli", "chat", "--model", str(tiny_model_dir), "--max-tokens", "4",
            "--threads", "1", "--sessions-dir", str(tmp_path)]
    script = "/save early\nhello robot\n/save s1\n/save ../x\n/load nothing\n/sessions\n/reset\n/load s1\n/stats\nexit\n"
    r = subprocess.run(args, input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "nothing to save" in r.stderr and "Invalid session name" in r.stderr
    assert "No saved session named 'nothing'" in r.stderr and "Traceback" not in r.stderr
    assert "(saved " in r.stdout and "s1: " in r.stdout and "(loaded 's1': 2 messages" in r.stdout
    stats = [line for line in r.stdout.splitlines() if "turns " in line]
    assert len(stats) == 1 and "turns 1," in stats[0]  # after /reset + /load: the saved turn is back
    assert (tmp_path / "s1.safetensors").is_file() and not (tmp_path / "x.safetensors").exists()


# -- the server: save, restore into the prefix cache on a fresh server ----------------------------
def _chat(server, messages, max_tokens=8) -> dict:
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture()
def fresh_server(tiny_model_dir, tmp_path, one_torch_thread):
    """Servers over a new LLM each (an empty prefix cache), sharing one sessions folder."""
    started = []

    def make():
        started.append(start_server(tiny_server_llm(tiny_model_dir), sessions_dir=tmp_path))
        return started[-1]

    yield make
    for s in started:
        s.stop()


def test_api_save_then_load_into_a_fresh_server_hits_the_prefix_cache(fresh_server):
    history = HISTORY[:3]
    a = fresh_server()
    r = httpx.post(a.v1 + "/sessions/talk/save", json={"messages": history})
    assert r.status_code == 200, r.text
    saved = r.json()
    assert saved["num_tokens"] % 16 == 0 and saved["num_tokens"] >= 32
    reference = _chat(a, HISTORY)  # same request on the server that computed it all
    a.stop()

    b = fresh_server()
    listed = httpx.get(b.v1 + "/sessions").json()["data"]
    assert [(s["name"], s["num_tokens"], s["compatible"]) for s in listed] == [("talk", saved["num_tokens"], True)]
    cached_before = b.state.stats()["blocks_cached"]
    r = httpx.post(b.v1 + "/sessions/talk/load")
    assert r.status_code == 200, r.text
    loaded = r.json()
    assert loaded["blocks_restored"] == saved["num_tokens"] // 16 and loaded["blocks_already_cached"] == 0
    assert b.state.stats()["blocks_cached"] == cached_before + loaded["blocks_restored"]
    assert b.state.stats()["blocks_used"] == 0
    got = _chat(b, HISTORY)
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == saved["num_tokens"]
    assert got["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    again = httpx.post(b.v1 + "/sessions/talk/load").json()  # already there: nothing written
    assert again["blocks_restored"] == 0 and again["blocks_already_cached"] == loaded["blocks_restored"]


def test_api_refuses_bad_names_foreign_and_corrupt_files(fresh_server, tmp_path):
    srv = fresh_server()
    for name in ("..%2F..%2Fetc", "a.b", "-x"):
        r = httpx.post(srv.v1 + f"/sessions/{name}/load")
        assert r.status_code in (400, 404) and r.json()["error"], (name, r.text)
    assert httpx.post(srv.v1 + "/sessions/missing/load").status_code == 404
    r = httpx.post(srv.v1 + "/sessions/x/save", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "less than one" in r.json()["error"]["message"]
    r = httpx.post(srv.v1 + "/sessions/x/save", json={})
    assert r.status_code == 400 and "either" in r.json()["error"]["message"]

    llm = srv.state.llm
    c = llm.config
    foreign = dataclasses.replace(fingerprint(llm), model="someone-else")
    save_snapshot(tmp_path / "foreign.safetensors", _snap(32, c.num_layers, c.num_kv_heads, c.head_dim, foreign))
    r = httpx.post(srv.v1 + "/sessions/foreign/load")
    assert r.status_code == 400 and "someone-else" in r.json()["error"]["message"]

    ok = httpx.post(srv.v1 + "/sessions/good/save", json={"token_ids": list(range(1, 40))})
    assert ok.status_code == 200 and ok.json()["num_tokens"] == 32
    path = tmp_path / "good.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    cached = srv.state.stats()["blocks_cached"]
    srv.state.llm.engine.kv.reset_prefix_cache()
    r = httpx.post(srv.v1 + "/sessions/good/load")
    assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"]
    assert srv.state.stats()["blocks_cached"] == 0 <= cached  # nothing half-loaded
    assert httpx.delete(srv.v1 + "/sessions/good").status_code == 200
    assert httpx.delete(srv.v1 + "/sessions/good").status_code == 404


def test_cli_saved_session_restores_into_the_server(tiny_llm, fresh_server, tmp_path, one_torch_thread):
    """One file format: a chat saved by `kvcache chat` warms the server's prefix cache."""
    chat = tiny_llm.session(system="You are terse.")
    chat.send("Tell me a story about the robot and the stars.", GREEDY)
    SessionStore(tmp_path, tiny_llm).save("from-cli", chat.snapshot())
    srv = fresh_server()
    loaded = httpx.post(srv.v1 + "/sessions/from-cli/load").json()
    assert loaded["blocks_restored"] == len(chat.token_ids) // 16 > 0
    got = _chat(srv, chat.messages + [{"role": "user", "content": "More?"}])
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


def test_server_over_int8_blocks_streams_and_refuses_sessions(tiny_model_dir, tmp_path, one_torch_thread):
    """A server whose paged engine holds quantized blocks answers (streamed and not, the same
    text) and refuses session save/load with a 400, then keeps serving."""
    llm = tiny_server_llm(tiny_model_dir, kv_policy="quantized:bits=8,key_axis=token,residual=0")
    srv = start_server(llm, sessions_dir=tmp_path)
    try:
        body = {"model": MODEL_ID, "messages": HISTORY[:1], "max_tokens": 12, "temperature": 0}
        whole = httpx.post(srv.v1 + "/chat/completions", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        pieces = []
        with httpx.stream("POST", srv.v1 + "/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    pieces.append(delta.get("content") or "")
        assert "".join(pieces) == whole.json()["choices"][0]["message"]["content"]
        for path, kw in (("/sessions/s/save", {"json": {"messages": HISTORY[:3]}}), ("/sessions/s/load", {})):
            r = httpx.post(srv.v1 + path, **kw)
            assert r.status_code == 400 and "quantized" in r.json()["error"]["message"], r.text
        again = httpx.post(srv.v1 + "/chat/completions", json=body, timeout=60).json()  # still serving
        assert again["choices"][0]["message"] == whole.json()["choices"][0]["message"]
        assert srv.state.stats()["blocks_used"] == 0
    finally:
        srv.stop()


def streamed_text(srv, body: dict) -> str:
    """The content of a streamed chat completion, its deltas joined."""
    pieces = []
    with httpx.stream("POST", srv.v1 + "/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    return "".join(pieces)


@pytest.mark.parametrize("policy", ["sinks:n_sink=4,window=24", "evict:scorer=snapkv,ratio=0.5,window=8"])
def test_server_over_sinks_or_evicted_blocks_streams_hits_the_prefix_cache_and_saves_sessions(
        tiny_model_dir, tmp_path, one_torch_thread, policy):
    """A server running attention sinks (the history passes the window) or SnapKV eviction on
    its paged engine streams what it answers whole, equals LLM.generate under the same policy,
    serves a resent history from cached blocks, and saves and reloads a session."""
    llm = tiny_server_llm(tiny_model_dir, kv_policy=policy)
    srv = start_server(llm, sessions_dir=tmp_path)
    try:
        body = {"model": MODEL_ID, "messages": HISTORY, "max_tokens": 12, "temperature": 0}
        whole = httpx.post(srv.v1 + "/chat/completions", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        ids = llm.chat_ids(HISTORY)
        assert len(ids) > 24 + 16
        ref = tiny_server_llm(tiny_model_dir, kv_policy=policy).generate(
            [ids], SamplingParams(max_tokens=12, temperature=0.0))[0]
        assert whole.json()["choices"][0]["message"]["content"] == ref.text
        assert streamed_text(srv, body) == ref.text
        again = httpx.post(srv.v1 + "/chat/completions", json=body, timeout=60).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
        saved = httpx.post(srv.v1 + "/sessions/s/save", json={"messages": HISTORY}, timeout=60)
        assert saved.status_code == 200 and saved.json()["num_tokens"] >= 16, saved.text
        assert httpx.post(srv.v1 + "/sessions/s/load", timeout=60).status_code == 200
        assert srv.state.stats()["blocks_used"] == 0
    finally:
        srv.stop()


def test_server_over_per_request_policy_caches_streams_and_refuses_sessions(tiny_model_dir, tmp_path,
                                                                           one_torch_thread):
    """A policy paged blocks cannot hold (KIVI per-channel keys + exact residual) is served on
    per-request caches in the same continuous batch: streamed equals whole equals
    LLM.generate; several requests at once each equal their own answer; sessions, which need
    float blocks, are refused with a 400."""
    policy = "quantized:bits=4,group_size=16,residual=16"
    llm = tiny_server_llm(tiny_model_dir, kv_policy=policy)
    srv = start_server(llm, sessions_dir=tmp_path)
    try:
        body = {"model": MODEL_ID, "messages": HISTORY, "max_tokens": 12, "temperature": 0}
        ids = llm.chat_ids(HISTORY)
        ref = tiny_server_llm(tiny_model_dir, kv_policy=policy).generate(
            [ids], SamplingParams(max_tokens=12, temperature=0.0))[0]
        whole = httpx.post(srv.v1 + "/chat/completions", json=body, timeout=60)
        assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] == ref.text
        assert streamed_text(srv, body) == ref.text
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: httpx.post(srv.v1 + "/chat/completions", json=body, timeout=60), range(4)))
        assert all(a.json()["choices"][0]["message"]["content"] == ref.text for a in answers)
        saved = httpx.post(srv.v1 + "/sessions/s/save", json={"messages": HISTORY}, timeout=60)
        assert saved.status_code == 400 and saved.json()["error"]["code"] == "sessions_unsupported"
        assert srv.state.stats()["blocks_used"] == 0
    finally:
        srv.stop()


def test_a_session_saved_under_other_weights_is_refused(tiny_model_dir, tmp_path, one_torch_thread):
    """K/V computed from float weights do not continue a conversation on int8 weights."""
    llm = _fresh_llm(tiny_model_dir)
    a = llm.session()
    a.send("Tell me a story about the robot.", GREEDY)
    SessionStore(tmp_path, llm).save("story", a.snapshot())
    int8 = _fresh_llm(tiny_model_dir, quantization="int8")
    assert int8.weights_key.startswith("int8(digits=2,calibration=") and llm.weights_key == "none"
    with pytest.raises(SnapshotError, match="its weights' quantization differs"):
        SessionStore(tmp_path, int8).load("story")
