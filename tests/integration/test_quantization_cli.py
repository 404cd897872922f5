"""`--quantization` on the command line: bad requests are one sentence and exit 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.helpers import write_gguf


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcache.cli", *args], capture_output=True, text=True, timeout=120)


def test_an_unsupported_gguf_tensor_type_exits_2_naming_it(tmp_path):
    path = tmp_path / "kquant.gguf"
    write_gguf(path, {"token_embd.weight": (np.zeros((8, 256), np.float32), "Q8_0"),
                      "blk.0.ffn_up.weight": (np.zeros((4, 256), np.float32), "Q2_K")})
    r = run_cli("generate", "--model", str(path), "--prompt", "hi", "--quantization", "gguf")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error: kquant.gguf stores blk.0.ffn_up.weight as Q2_K") and "Q8_0, Q4_0, Q4_1" in err
    assert "Traceback" not in r.stderr and err.count("\n") == 0


def test_gguf_quantization_of_a_float_folder_exits_2(tiny_model_dir):
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--quantization", "gguf")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: quantization='gguf' keeps a GGUF file's own formats")


def test_generate_with_int8_weights(tiny_model_dir):
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "Once upon a time", "--max-tokens", "4",
                "--threads", "1", "--quantization", "int8", "--json")
    assert r.returncode == 0, r.stderr
    assert '"token_ids"' in r.stdout
