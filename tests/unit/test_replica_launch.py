"""`kvcache serve --replicas N` (`replicas.launch.run`) stops on SIGTERM as on Ctrl-C: the
application and the Ray instance it started are taken down, the signal handler restored."""

from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("ray", reason="ray[serve] is not installed")

from kvcache.replicas import launch  # noqa: E402


@pytest.fixture
def sigterm_outside_run():
    """A SIGTERM handler of the test's own while it runs: a signal `run` did not take fails the test
    instead of ending the process."""

    def outside(signum, frame):
        raise AssertionError("the SIGTERM reached the handler outside run()")

    before = signal.signal(signal.SIGTERM, outside)
    yield outside
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_takes_the_application_and_ray_down(monkeypatch, signum, sigterm_outside_run):
    calls = []
    monkeypatch.setattr(launch, "start_ray", lambda address: calls.append("start_ray") or True)
    monkeypatch.setattr(launch, "deploy", lambda opts: calls.append("deploy"))
    monkeypatch.setattr(launch.serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(launch.ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(launch.time, "sleep", lambda s: os.kill(os.getpid(), signum))  # stopped while serving
    launch.run(launch.ClusterOptions(replicas=2, spec=None, server=None))  # returns: nothing escapes
    assert calls == ["start_ray", "deploy", "serve.shutdown", "ray.shutdown"]
    assert signal.getsignal(signal.SIGTERM) is sigterm_outside_run  # restored


def test_a_joined_cluster_is_left_running(monkeypatch, sigterm_outside_run):
    calls = []
    monkeypatch.setattr(launch, "start_ray", lambda address: False)  # joined: not started here
    monkeypatch.setattr(launch, "deploy", lambda opts: None)
    monkeypatch.setattr(launch.serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(launch.ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(launch.time, "sleep", lambda s: os.kill(os.getpid(), signal.SIGTERM))
    launch.run(launch.ClusterOptions(replicas=1, spec=None, server=None), address="127.0.0.1:6379")
    assert calls == ["serve.shutdown"]
