"""`kvcache serve --replicas`: two engine replicas on a local Ray instance behind one ingress.

Ray starts once for the module (2 CPUs, replicas of one thread, the tiny model); everything
listens on 127.0.0.1. Replies through the replicas equal the single server's (greedy), errors
are its sentences, the API key holds, prefix routing keeps a shared prefix on one replica,
round-robin alternates, and /metrics shows each replica.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from kvcache.bench.serve import free_port
from tests.server.harness import MODEL_ID, start_server, tiny_server_llm

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

KEY = "sesame"
REPLICA = "x-kvcache-replica"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = ("Once upon a time there was a little robot who loved to read books about the stars and the moon "
        "and every night it climbed to the roof to count them one by one")


def llm_kwargs(model_dir) -> dict:
    return dict(model=str(model_dir), dtype="float32", device="cpu", progress=False, threads=1,
                kv_cache_memory="4MiB", block_size=4)


def deploy(model_dir, port: int, routing: str):
    from kvcache.replicas.launch import ClusterOptions, deploy as serve_deploy
    from kvcache.replicas.replica import ReplicaSpec
    from kvcache.server import ServerConfig

    spec = ReplicaSpec(llm=llm_kwargs(model_dir), server=ServerConfig(model_name=MODEL_ID))
    serve_deploy(ClusterOptions(replicas=2, spec=spec, server=ServerConfig(model_name=MODEL_ID, api_key=KEY),
                                routing=routing, host="127.0.0.1", port=port))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:  # until the router knows both replicas
        r = httpx.get(url + "/v1/cache/replicas", headers=AUTH, timeout=30)
        if r.status_code == 200 and len(r.json()["replicas"]) == 2:
            return url
        time.sleep(0.5)
    raise RuntimeError("the replicas did not come up")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    from ray import serve

    from kvcache.replicas.launch import start_ray

    start_ray(num_cpus=2)
    port = free_port()
    try:
        yield {"url": deploy(tiny_model_dir, port, "prefix"), "port": port, "model_dir": tiny_model_dir}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(tiny_model_dir, cluster):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = start_server(tiny_server_llm(tiny_model_dir, block_size=4), api_key=KEY)
    yield srv
    srv.stop()
    torch.set_num_threads(before)


def post(url: str, path: str, body, headers=AUTH) -> httpx.Response:
    kw = {"json": body} if not isinstance(body, (bytes, str)) else {"content": body}
    return httpx.post(url + path, headers={**headers, "Content-Type": "application/json"}, timeout=60, **kw)


def completion(prompt: str, n: int = 6) -> dict:
    return {"model": MODEL_ID, "prompt": prompt, "max_tokens": n, "temperature": 0}


def test_replies_equal_the_single_servers(cluster, single):
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "tell me about the moon"}],
            "max_tokens": 8, "temperature": 0}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion(LONG, 8))):
        ours, ref = post(cluster["url"], path, body), post(single.url, path, body)
        assert ours.status_code == ref.status_code == 200
        a, b = ours.json(), ref.json()
        assert a["choices"] == b["choices"]
        assert a["usage"] == b["usage"]
        assert re.fullmatch(r"[0-9a-z]+", ours.headers["x-kvcache-replica"])
    stream = post(cluster["url"], "/v1/completions", {**completion(LONG, 8), "stream": True})
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    text = "".join(re.findall(r'"text": "([^"]*)"', stream.text))
    assert text == post(single.url, "/v1/completions", completion(LONG, 8)).json()["choices"][0]["text"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 100000}),
    ("/v1/completions", {"model": "other", "prompt": "hi"}),
    ("/v1/chat/completions", {"model": MODEL_ID}),
    ("/v1/chat/completions", b"{not json"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "suffix": "x"}),
])
def test_bad_input_gets_the_single_servers_sentence(cluster, single, path, body):
    ours, ref = post(cluster["url"], path, body), post(single.url, path, body)
    assert 400 <= ours.status_code < 500 and ours.status_code == ref.status_code
    assert ours.json() == ref.json()


def test_api_key_is_enforced(cluster, single):
    body = completion("hi", 2)
    ours, ref = post(cluster["url"], "/v1/completions", body, headers={}), post(single.url, "/v1/completions", body,
                                                                               headers={})
    assert ours.status_code == ref.status_code == 401 and ours.json() == ref.json()
    assert httpx.get(cluster["url"] + "/metrics").status_code == 401
    assert httpx.get(cluster["url"] + "/health").status_code == 200  # open, as on the single server
    big = post(cluster["url"], "/v1/completions", {"model": MODEL_ID, "prompt": "x" * (5 << 20)})
    assert big.status_code == 413


def test_a_shared_prefix_lands_on_its_replica_and_is_cached(cluster):
    firsts = {}
    for topic in ("stars", "rivers"):  # two fresh prefixes: idle replicas take them in turn
        r = post(cluster["url"], "/v1/completions", completion(f"{topic} {LONG}", 2))
        firsts[topic] = r.headers["x-kvcache-replica"]
    assert len(set(firsts.values())) == 2
    for topic in ("stars", "stars", "rivers", "rivers", "stars"):  # no rotation gives this order
        r = post(cluster["url"], "/v1/completions", completion(f"{topic} {LONG} and then it slept", 2))
        assert r.headers["x-kvcache-replica"] == firsts[topic]
        usage = r.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] // 2


def test_metrics_show_each_replica(cluster):
    post(cluster["url"], "/v1/completions", completion(LONG, 2))
    text = httpx.get(cluster["url"] + "/metrics", headers=AUTH, timeout=30).text
    ids = set(re.findall(r'kvcache_kv_blocks_total\{replica="([0-9a-z]+)"\} \d+', text))
    assert len(ids) == 2
    routed = dict(re.findall(r'kvcache_routed_requests_total\{replica="([0-9a-z]+)"\} (\d+)', text))
    assert set(routed) <= ids and sum(int(n) for n in routed.values()) >= 1
    assert re.search(r"^kvcache_cluster_kv_blocks_total (\d+)$", text, re.M)
    assert re.search(r"^kvcache_cluster_prefix_cache_hit_rate \S+$", text, re.M)
    assert text.count("# HELP kvcache_kv_blocks_total ") == 1
    rows = httpx.get(cluster["url"] + "/v1/cache/replicas", headers=AUTH, timeout=30).json()["replicas"]
    assert {row["replica"] for row in rows} == ids
    assert all(row["blocks_total"] > 0 and "routed" in row for row in rows)
    assert 'id="replicas"' in httpx.get(cluster["url"] + "/dashboard", timeout=30).text


def test_a_pinned_replica_answers_and_an_unknown_one_is_refused(cluster):
    rows = httpx.get(cluster["url"] + "/v1/cache/replicas", headers=AUTH, timeout=30).json()["replicas"]
    for row in rows:
        r = post(cluster["url"], "/v1/completions", completion("pinned", 2), {**AUTH, "X-Kvcache-Replica": row["replica"]})
        assert r.headers["x-kvcache-replica"] == row["replica"]
    r = post(cluster["url"], "/v1/completions", completion("pinned", 2), {**AUTH, "X-Kvcache-Replica": "nope"})
    assert r.status_code == 400 and "No replica 'nope'" in r.json()["error"]["message"]


def test_round_robin_alternates(cluster):
    url = deploy(cluster["model_dir"], cluster["port"], "round-robin")
    seen = [post(url, "/v1/completions", completion(LONG, 1)).headers["x-kvcache-replica"] for _ in range(4)]
    assert seen[0] != seen[1] and seen[0::2] == [seen[0]] * 2 and seen[1::2] == [seen[1]] * 2


# -- the ingress on a lost replica, without Ray (a stand-in handle) ----------------------------

class _Stream:
    """What `handle.options(stream=True).forward.remote(...)` gives: items, or an exception to raise."""

    def __init__(self, *items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class _Engines:
    def __init__(self, *streams):
        self.streams, self.pins = list(streams), []

    def options(self, **_):
        return self

    @property
    def forward(self):
        return self

    def remote(self, req, hashes=None, pin=None):
        self.pins.append(pin)
        return self.streams.pop(0)


def _front(*streams):
    from kvcache.replicas.ingress import Front
    from kvcache.server import ServerConfig

    return Front(_Engines(*streams), ServerConfig(model_name=MODEL_ID), "prefix")


def _start(replica: str):
    from kvcache.replicas.bridge import ResponseStart

    return ResponseStart(200, [(b"content-type", b"text/event-stream; charset=utf-8")], replica)


async def _body(front, start, first, chunks) -> bytes:
    return b"".join([c async for c in front.relay(start, first, chunks)])


def test_a_request_lost_before_its_first_chunk_is_sent_again_and_counted():
    import asyncio

    from kvcache.replicas.bridge import HTTPRequest

    lost = ray.exceptions.ActorDiedError()
    unavailable = ray.exceptions.ActorUnavailableError("gone", None)
    front = _front(_Stream(_start("a"), lost), _Stream(unavailable), _Stream(_start("b"), b"data: 1\n\n", b"data: [DONE]\n\n"))
    start, first, chunks = asyncio.run(front.open(HTTPRequest("POST", "/v1/completions"), [1, 2], None))
    assert start.replica == "b" and front.retries == 2 and front.routed == {"b": 1}
    assert asyncio.run(_body(front, start, first, chunks)) == b"data: 1\n\ndata: [DONE]\n\n"
    assert front.cut_streams == 0


def test_a_pinned_request_whose_replica_is_lost_is_not_sent_elsewhere():
    import asyncio

    from kvcache.replicas.bridge import HTTPRequest
    from kvcache.server.errors import APIError

    front = _front(_Stream(ray.exceptions.ActorDiedError()), _Stream(_start("b"), b"x"))
    with pytest.raises(APIError) as err:
        asyncio.run(front.open(HTTPRequest("POST", "/v1/completions"), [], "a"))
    assert err.value.status == 503 and front.engines.pins == ["a"] and front.retries == 1


def test_a_stream_lost_after_its_first_chunk_ends_with_an_error_event():
    import asyncio

    from kvcache.replicas.bridge import HTTPRequest

    front = _front(_Stream(_start("a"), b"data: 1\n\n", b"data: 2\n\n", ray.exceptions.ActorDiedError()))
    start, first, chunks = asyncio.run(front.open(HTTPRequest("POST", "/v1/completions"), [], None))
    body = asyncio.run(_body(front, start, first, chunks)).decode()
    events = [e[6:] for e in body.split("\n\n") if e]
    assert events[:2] == ["1", "2"] and events[-1] == "[DONE]"
    assert json.loads(events[2])["error"]["code"] == "replica_lost"
    assert front.cut_streams == 1 and front.retries == 0


# -- faults (these kill a replica; Serve starts another before each returns) ------------------

def replica_rows(url: str) -> list[dict]:
    return httpx.get(url + "/v1/cache/replicas", headers=AUTH, timeout=30).json()["replicas"]


def wait_replaced(url: str, lost: str, timeout: float = 120.0) -> list[dict]:
    """Until two replicas answer again and the lost one is not among them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = replica_rows(url)
        if len(rows) == 2 and lost not in {r["replica"] for r in rows}:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"Serve did not replace replica {lost} within {timeout:.0f} s")


def lose(row: dict) -> None:
    """The replica's process stops at once (nothing more leaves it), then is killed."""
    os.kill(row["pid"], signal.SIGSTOP)
    os.kill(row["pid"], signal.SIGKILL)


def counter(url: str, name: str) -> int:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
    return int(float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)))


def test_a_stream_cut_off_by_a_lost_replica_ends_with_an_error_event_and_serve_replaces_it(cluster):
    url = cluster["url"]
    victim = replica_rows(url)[0]
    cut_before = counter(url, "kvcache_streams_cut_total")
    body = {**completion(LONG, 160), "stream": True, "ignore_eos": True}
    headers = {**AUTH, REPLICA: victim["replica"]}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break  # a first token reached the client
        lose(victim)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_lost" and "lost" in error["message"]
    assert all("error" not in json.loads(e) for e in events[:-2])
    assert counter(url, "kvcache_streams_cut_total") == cut_before + 1
    rows = wait_replaced(url, victim["replica"])
    assert all(r["pid"] != victim["pid"] for r in rows)
    assert post(url, "/v1/completions", completion(LONG, 2)).status_code == 200


def test_requests_a_lost_replica_never_answered_are_answered_by_another(cluster):
    url = cluster["url"]
    rows = wait_replaced(url, "")
    victim, other = rows
    want = post(url, "/v1/completions", completion(LONG, 6), {**AUTH, REPLICA: other["replica"]}).json()
    os.kill(victim["pid"], signal.SIGSTOP)  # what is sent to it now stays unanswered
    got: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: got.append(post(url, "/v1/completions", completion(LONG, 6))))
               for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    assert [r.status_code for r in got] == [200] * 4
    assert all(r.json()["choices"] == want["choices"] for r in got)
    assert {r.headers[REPLICA] for r in got} == {other["replica"]}
    wait_replaced(url, victim["replica"])


def test_nothing_listens_beyond_loopback(cluster):
    """Ray's services (GCS, raylet, workers, agents) and Serve's proxy, all started by this process."""
    import psutil

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    listening = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    assert any(port == cluster["port"] for _, _, port in listening)
    loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    assert [x for x in listening if x[1] not in loopback] == [], listening
