"""The solo runtime (`kvcache generate/chat --solo`) on the real default model, against the engine."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from kvcache import LLM
from kvcache.api.llm import chat_template_ids
from kvcache.eval.corpus import corpus_token_ids
from kvcache.eval.perplexity import perplexity
from kvcache.models.loader import DEFAULT_MODEL
from kvcache.solo import load_solo

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(2)
    return LLM(DEFAULT_MODEL, dtype="float32", progress=False, quantization="gguf"), load_solo(DEFAULT_MODEL)


def test_chat_templates_render_the_engines_token_ids(pair):
    llm, solo = pair
    for messages in ([{"role": "user", "content": "Who wrote Hamlet?"}],
                     [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Ça va ?"}]):
        assert solo.tokenizer.chat_ids(messages) == chat_template_ids(llm.tokenizer, messages)
    assert solo.tokenizer.encode("The capital of France is") == llm.encode("The capital of France is")
    assert llm.tokenizer.eos_token_id in solo.tokenizer.end_ids


def test_perplexity_is_within_one_percent_of_the_engines(pair):
    """Prompts run with int8 activations here (every row through the packed kernels) and with the
    float weights' matmul in the engine's prefill: the one difference, bounded as gguf's own cost is."""
    llm, solo = pair
    ids = corpus_token_ids(llm.tokenizer, 1024)
    solo.model.truncate(0)
    ours, engine = math.exp(solo.model.token_losses(ids).mean()), perplexity(llm, ids, 1024)
    assert abs(ours / engine - 1) < 0.01, (ours, engine)


def test_the_cli_runs_without_torch_and_answers(tmp_path):
    code = ("import sys; from kvcache.cli import main; "
            "rc = main(['generate', '--solo', '--json', '--prompt', 'The capital of France is', '--max-tokens', '6']); "
            "print('torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    reply = json.loads(out[0])
    assert out[1] == "False 0" and "Paris" in reply["text"] and reply["metrics"]["runtime"] == "solo"
