"""lm-evaluation-harness against the server: `local-completions` on a few items of the repository's
multiple-choice task (benchmarks/lm_eval) gives the loglikelihoods of lm-eval's own `hf` backend on
the same tiny float32 weights, and the same accuracy, whether lm-eval tokenizes with a local
tokenizer folder or through the server's /tokenizer_info and /tokenize."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from benchmarks.lm_eval.run_lm_eval import (  # noqa: E402
    OFFLINE_ENV,
    compare,
    evaluate,
    hf_model_args,
    server_model_args,
    write_task,
)
from tests.server.harness import MODEL_ID, start_server, tiny_server_llm  # noqa: E402

ITEMS = 4


@pytest.fixture(scope="module")
def offline():
    mp = pytest.MonkeyPatch()
    for key, value in OFFLINE_ENV.items():
        mp.setenv(key, value)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lm_eval_task"))


@pytest.fixture(scope="module")
def hf_run(tiny_model_dir, task_dir, offline, one_torch_thread):
    """lm-eval's own transformers backend on the tiny folder: the reference."""
    return evaluate("hf", hf_model_args(str(tiny_model_dir)), task_dir, ITEMS)


@pytest.mark.parametrize("tokenizer", ["local", "remote"])
def test_lm_eval_on_the_server_matches_its_hf_backend(tiny_model_dir, task_dir, hf_run, tokenizer):
    server = start_server(tiny_server_llm(tiny_model_dir))
    try:
        args = server_model_args(server.url, MODEL_ID, str(tiny_model_dir))
        if tokenizer == "remote":  # lm-eval finds /tokenizer_info and /tokenize on the server by itself
            del args["tokenizer"]
            args["tokenizer_backend"] = "auto"
        ours = evaluate("local-completions", args, task_dir, ITEMS)
        requests = dict(server.state.metrics.requests)
    finally:
        server.stop()
    # 4 choices per item, 4 prompts per request (batch_size 4), none refused
    assert requests.pop(("/v1/completions", 200)) == ITEMS
    if tokenizer == "remote":
        assert requests.pop(("/tokenizer_info", 200)) >= 1 and requests.pop(("/tokenize", 200)) >= 4 * ITEMS
    assert requests == {}, requests
    result = compare(ours, hf_run)
    assert result["items"] == ITEMS and result["choices"] == 4 * ITEMS
    assert result["max_abs_diff"] < 1e-3, result["rows"]
    assert result["server_acc"] == result["hf_acc"]
    assert result["server_acc_norm"] == result["hf_acc_norm"]
    # the random-weight model scores every choice differently: a real comparison, not ties
    assert len({round(r["hf"], 3) for r in result["rows"]}) == len(result["rows"])
