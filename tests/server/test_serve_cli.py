"""`kvcache serve` as a command: starts, answers, refuses bad flags with one sentence."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvcache.cli", "serve", *args]


@pytest.mark.parametrize("policy, words", [
    ("window:size=abc", "not a valid int"),
    ("tiered+window", "do not combine it with a selector"),
])
def test_kv_policy_the_server_cannot_run_is_one_sentence(tiny_model_dir, policy, words):
    r = subprocess.run(_serve("--model", str(tiny_model_dir), "--kv-policy", policy),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_bad_port_is_one_sentence(tiny_model_dir):
    r = subprocess.run(_serve("--model", str(tiny_model_dir), "--port", "70000"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--port must be in 1..65535" in r.stderr and "Traceback" not in r.stderr


def test_serve_starts_answers_and_stops(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(_serve("--model", str(tiny_model_dir), "--port", str(port), "--kv-cache-memory", "4MiB",
                                   "--threads", "1", "--api-key", "k", "--log-level", "warning",
                                   "--sessions-dir", str(tmp_path)), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        body = {"model": str(tiny_model_dir), "prompt": "Once upon a time", "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert "kvcache_kv_blocks_total" in httpx.get(url + "/metrics", headers={"Authorization": "Bearer k"}).text
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) in (0, -15)  # uvicorn shuts down gracefully, then re-raises SIGTERM
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.parametrize("host, api_key, warned", [
    ("0.0.0.0", None, True), ("192.168.1.20", None, True), ("0.0.0.0", "k", False),
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
])
def test_a_non_loopback_host_without_api_key_is_warned_about(monkeypatch, capsys, host, api_key, warned):
    """Anyone who can reach a non-loopback address can use an open server: one warning line
    before it starts; loopback, or an API key, starts it quietly."""
    import kvcache.server
    from kvcache import cli

    served = []
    monkeypatch.setattr(cli, "_make_llm", lambda args, **engine: "llm")
    monkeypatch.setattr(kvcache.server, "serve", lambda llm, config, host, port, log_level: served.append(host))
    assert cli.main(["serve", "--host", host, *(["--api-key", api_key] if api_key else [])]) == 0
    err = capsys.readouterr().err
    assert served == [host]
    want = f"warning: serving on {host} without --api-key; anyone who can reach it can use it.\n"
    assert err == (want if warned else "")


def test_the_single_server_imports_no_ray():
    """Without --replicas, `kvcache serve` parses, builds and serves without importing Ray."""
    code = ("import sys\n"
            "import kvcache.server\n"
            "from kvcache import cli\n"
            "cli._make_llm = lambda args, **engine: 'llm'\n"
            "kvcache.server.serve = lambda llm, config, host, port, log_level: None\n"
            "assert cli.main(['serve', '--port', '8123']) == 0\n"
            "print('ray' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("flags, words", [
    (["--ray-address", "10.0.0.1:6379"], "--ray-address applies to replicas; give --replicas N too."),
    (["--routing", "round-robin"], "--routing applies to replicas; give --replicas N too."),
    (["--replicas", "0"], "expected a positive integer, got 0"),
    (["--replicas", "2", "--routing", "random"], "invalid choice: 'random'"),
])
def test_replica_flags_are_checked_before_anything_starts(flags, words):
    r = subprocess.run(_serve(*flags), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
