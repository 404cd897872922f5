"""Fixtures for the server tests (the harness is in harness.py)."""

from __future__ import annotations

import pytest

from tests.server.harness import start_server, tiny_server_llm


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """The default test server: tiny model, no API key, sessions in a temp folder."""
    srv = start_server(tiny_server_llm(tiny_model_dir), sessions_dir=tmp_path_factory.mktemp("sessions"))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
