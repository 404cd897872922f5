"""A `kvcache serve` process for a benchmark: the real command line on a free 127.0.0.1 port,
started, waited for, and stopped (Ctrl-C first, then its whole process session) by the script."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kvcache.errors import KVCacheError


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_env() -> dict:
    """This environment, with the kvcache this script imported first on PYTHONPATH (so the servers,
    and the workers they start, run the code the record names)."""
    import kvcache

    src = str(Path(kvcache.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


class ServeProcess:
    """`python -m kvcache.cli serve --host 127.0.0.1 --port P <serve_args>` as a context manager;
    `url` is where it answers. `ready` (overridable) says when it is up: /health answers 200."""

    def __init__(self, serve_args: list[str], err, label: str, start_timeout: float = 300.0):
        self.err, self.label, self.start_timeout = err, label, start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "kvcache.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    *serve_args]
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()

    def say(self, text: str) -> None:
        """A progress line on stderr, as written (no markup: the label is in brackets)."""
        self.err.print(f"[{self.label}] {text}", markup=False, highlight=False)

    def ready(self) -> bool:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).status_code == 200

    def __enter__(self) -> "ServeProcess":
        import httpx

        self.say(f"starting: {' '.join(self.cmd[3:])}")
        t0 = time.perf_counter()
        # its own session: stopping it reaches every process it started, and nothing else
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=source_env())
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KVCacheError(f"The {self.label} server exited with code {self.proc.returncode}: {self.tail()}")
            try:
                if self.ready():
                    self.say(f"up in {time.perf_counter() - t0:.0f} s")
                    return self
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        self.stop()
        raise KVCacheError(f"The {self.label} server did not come up within {self.start_timeout:.0f} s.")

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self) -> str:
        """The last line the server wrote (its reason, when it exits early)."""
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        """Ctrl-C (the server closes its engines, flushing a tier's writes), then the process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it left behind in its session
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None


def run_clients(items: list, clients: int, send) -> tuple[list, float]:
    """`send(client, item)` for every item through `clients` concurrent httpx clients, each taking
    the next item when it is free: (the results in the items' order, wall seconds). The first
    failure stops the clients and is raised as one sentence (KVCacheError)."""
    import httpx

    todo = list(enumerate(items))
    lock = threading.Lock()
    results: list = [None] * len(items)
    failures: list[str] = []

    def client_loop():
        with httpx.Client() as client:
            while True:
                with lock:
                    if not todo or failures:
                        return
                    i, item = todo.pop(0)
                try:
                    results[i] = send(client, item)
                except Exception as exc:  # noqa: BLE001 - reported once below
                    with lock:
                        failures.append(str(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise KVCacheError(failures[0])
    return results, wall
