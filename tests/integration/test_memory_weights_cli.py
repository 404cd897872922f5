"""`kvcache memory` with the weights: their bytes per quantization, and users that fit beside them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvcache.models.weight_bytes import gguf_weight_bytes
from tests.helpers import write_tiny_quantized_gguf

GiB = 2**30


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcache.cli", *args], capture_output=True, text=True, timeout=120)


def test_json_keeps_the_kv_alone_keys_and_adds_the_weights():
    r = run_cli("memory", "llama-2-7b", "--seq-len", "4096", "--budget", "16GiB", "--weights", "int4", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["max_batch_at_seq_len"], got["max_seq_len_at_batch"], got["blocks_in_budget"]) == (8, 32_768, 2048)
    w = got["weights"]
    assert set(w) == {"none_fp32", "none_bf16", "int8", "int4", "gguf"} and w["gguf"] is None
    assert got["weights_quantization"] == "int4" and got["weight_bytes"] == w["int4"]
    assert got["kv_budget_bytes"] == 16 * GiB - w["int4"]
    assert got["users_at_seq_len"] == (16 * GiB - w["int4"]) // (524_288 * 4096) == 5
    assert got["users_at_seq_len_by_weights"]["none_bf16"] == 1


def test_text_lists_every_quantization_and_the_users_beside_them():
    r = run_cli("memory", "llama-2-7b", "--seq-len", "4096", "--budget", "16GiB")
    assert r.returncode == 0, r.stderr
    for text in ("Weights: none (bf16 / fp16)", "Users at 4,096 tokens beside the weights", "1 sequence ",
                 "none (fp32)", "int8", "int4", "13,476,831,232"):
        assert text in r.stdout, text


def test_a_gguf_and_a_config_folder(tmp_path, tiny_model_dir, tiny_llm):
    """A GGUF: its own formats by default in bf16; a config.json: float weights as the loaded model holds them."""
    pytest.importorskip("gguf")
    path = write_tiny_quantized_gguf(tmp_path / "tiny.gguf", tied=False)
    r = run_cli("memory", str(path), "--dtype", "bf16", "--budget", "1MiB", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["weights"]["gguf"] == gguf_weight_bytes(path, 2) and got["weights"]["int4"] is not None
    from kvcache.native.build import wanted

    assert got["weights_quantization"] == ("gguf" if wanted() else "none")
    r = run_cli("memory", str(tiny_model_dir / "config.json"), "--dtype", "fp32", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["weights_quantization"] == "none" and got["weight_bytes"] == tiny_llm.model.weight_bytes


@pytest.mark.parametrize("args, words", [
    (["llama-2-7b", "--budget", "8GiB", "--weights", "none"], "none (bf16) weights of llama-2-7b take 12.55 GiB"),
    (["llama-2-7b", "--weights", "gguf"], "not a GGUF file"),
])
def test_weights_that_do_not_fit_or_do_not_apply_exit_2(args, words):
    r = run_cli("memory", *args)
    assert r.returncode == 2
    assert words in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_the_default_weights_never_refuse_a_budget():
    """auto: weights larger than the budget leave no users, and the KV-alone fields stay as before."""
    r = run_cli("memory", "llama-2-7b", "--budget", "8GiB", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["users_at_seq_len"] == 0 and got["kv_budget_bytes"] == 0 and got["max_batch_at_seq_len"] == 16
