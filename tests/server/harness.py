"""Test harness: a real server (uvicorn on a free loopback port, in a thread) over the tiny model."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

MODEL_ID = "tiny"


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    app: object
    uvicorn_server: object
    thread: threading.Thread

    @property
    def state(self):
        return self.app.state.server

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.uvicorn_server.should_exit = True
        self.thread.join(timeout=10)
        self.state.close()


def start_server(llm, **config) -> RunningServer:
    """Serve `llm` on 127.0.0.1:<free port> until `.stop()`."""
    import uvicorn

    from kvcache.server import ServerConfig, create_app

    app = create_app(llm, ServerConfig(model_name=MODEL_ID, **config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", app, server, thread)


def tiny_server_llm(model_dir, **engine):
    """A fresh LLM on the tiny model (its own engine, so servers never share one)."""
    import kvcache

    engine.setdefault("kv_cache_memory", "4MiB")
    return kvcache.LLM(str(model_dir), dtype="float32", device="cpu", progress=False, **engine)


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll until predicate() is true; False on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
