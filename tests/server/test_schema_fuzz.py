"""Schema fuzz of every endpoint (schemathesis, valid and invalid inputs) against a live server:
no 5xx ever, every 4xx an OpenAI-style error body, and the server still healthy after."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from tests.server.harness import MODEL_ID, start_server, tiny_server_llm

MAX_EXAMPLES = 15  # per endpoint and mode; keeps the whole fuzz well under a minute on 2 cores


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory, one_torch_thread):
    srv = start_server(tiny_server_llm(tiny_model_dir), sessions_dir=tmp_path_factory.mktemp("fuzz-sessions"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_server_errors(api_schema, fuzz_server, mode):
    """Every operation in the OpenAPI document, MAX_EXAMPLES generated requests each."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics",
                                              "/v1/sessions/{name}/save", "/v1/cache/blocks"}
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def fuzz(case):
            if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL_ID  # reach generation, not just the unknown-model 404
            response = case.call(base_url=fuzz_server.url, timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["type"] and "Traceback" not in error["message"]

        try:
            fuzz()
        except Unsatisfiable:  # nothing to get wrong: an operation without parameters or body
            assert mode == GenerationMode.NEGATIVE


def test_server_is_healthy_after_the_fuzz(fuzz_server):
    assert httpx.get(fuzz_server.url + "/health").json()["status"] == "ok"
    r = httpx.post(fuzz_server.v1 + "/completions", json={"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200
    assert fuzz_server.state.stats()["blocks_used"] == 0
    assert fuzz_server.state.metrics.in_flight == 0
    counts = fuzz_server.state.metrics.requests
    assert counts[("/v1/chat/completions", 200)] > 0 and counts[("/v1/chat/completions", 400)] > 0
