"""Choosing the device: cpu by default, cuda on request (bf16 by default there), and one
sentence with exit 2 when CUDA is asked for but torch sees no GPU."""

from __future__ import annotations

import pytest
import torch

import kvcache
from kvcache.api.llm import default_dtype, resolve_device
from kvcache.cli import main
from kvcache.errors import KVCacheError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_cpu_is_the_default_and_bf16_the_default_dtype_on_cuda():
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu").type == "cpu"
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert default_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "mps"])
def test_an_unknown_device_is_one_sentence(name):
    with pytest.raises(KVCacheError, match="Unknown device"):
        resolve_device(name)


@no_cuda
def test_cuda_without_a_gpu_fails_before_loading_anything(tmp_path):
    with pytest.raises(KVCacheError, match="sees no CUDA GPU"):
        kvcache.LLM(str(tmp_path / "no-such-model"), device="cuda")


@no_cuda
def test_the_cli_says_so_in_one_line_and_exits_2(capsys):
    assert main(["generate", "--prompt", "hello", "--device", "cuda", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,device,dtype", [
    ([], "cpu", "float32"),
    (["--device", "cuda"], "cuda", "bfloat16"),
    (["--device", "cuda:1", "--dtype", "float32"], "cuda:1", "float32"),
])
def test_the_cli_passes_the_device_and_its_default_dtype(monkeypatch, capsys, argv, device, dtype):
    seen = {}

    def fake_llm(model, **kw):
        seen.update(kw)
        raise KVCacheError("stop here.")

    monkeypatch.setattr(kvcache, "LLM", fake_llm)
    assert main(["generate", "--prompt", "hello", *argv]) == 2
    assert (seen["device"], seen["dtype"]) == (device, dtype)
