"""What quantization="auto" resolves to, per file, device, dtype and native build."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcache.errors import KVCacheError
from kvcache.models.quantization import resolve_quantization
from kvcache.native import qlinear
from tests.helpers import write_gguf

CPU = torch.device("cpu")


def _gguf(tmp_path, layer_type: str, name: str = "m.gguf"):
    path = tmp_path / name
    rng = np.random.default_rng(0)
    write_gguf(path, {"token_embd.weight": (rng.standard_normal((16, 256)).astype(np.float32), "Q8_0"),
                      "blk.0.ffn_up.weight": (rng.standard_normal((16, 256)).astype(np.float32), layer_type),
                      "blk.0.attn_norm.weight": (np.ones((1, 256), np.float32), "F32")})
    return path


@pytest.fixture()
def native(monkeypatch):
    monkeypatch.setattr(qlinear, "kernels", lambda: object())


def test_a_quantized_gguf_on_the_cpu_keeps_its_formats(tmp_path, native):
    path = _gguf(tmp_path, "Q4_1")
    assert resolve_quantization("auto", path, torch.float32, CPU) == "gguf"
    assert resolve_quantization(None, path, torch.bfloat16, CPU) == "gguf"


@pytest.mark.parametrize("dtype, device", [(torch.float16, CPU), (torch.float32, torch.device("cuda")),
                                           (torch.bfloat16, torch.device("meta"))])
def test_other_devices_and_dtypes_get_float_weights(tmp_path, native, dtype, device):
    assert resolve_quantization("auto", _gguf(tmp_path, "Q4_0"), dtype, device) == "none"


def test_float_checkpoints_and_unkept_formats_get_float_weights(tmp_path, native):
    float_gguf = tmp_path / "f.gguf"
    write_gguf(float_gguf, {"blk.0.ffn_up.weight": (np.ones((16, 256), np.float32), "F16")})
    assert resolve_quantization("auto", float_gguf, torch.float32, CPU) == "none"
    assert resolve_quantization("auto", None, torch.float32, CPU) == "none"  # an HF folder
    assert resolve_quantization("auto", _gguf(tmp_path, "Q2_K", "k.gguf"), torch.float32, CPU) == "none"


def test_without_the_native_kernels_auto_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(qlinear, "kernels", lambda: None)
    assert resolve_quantization("auto", _gguf(tmp_path, "Q4_1"), torch.float32, CPU) == "none"


def test_explicit_choices_are_kept_and_checked(tmp_path):
    path = _gguf(tmp_path, "Q4_1")
    assert resolve_quantization("none", path, torch.float32, CPU) == "none"
    assert resolve_quantization("INT4", None, torch.float32, CPU) == "int4"
    with pytest.raises(KVCacheError, match="not a GGUF file"):
        resolve_quantization("gguf", None, torch.float32, CPU)
