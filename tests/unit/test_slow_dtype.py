"""The warning for a dtype the CPU has no hardware for."""

from __future__ import annotations

import torch

from kvcache.models import linear


def test_bf16_is_called_slow_exactly_where_onednn_has_no_bf16_kernels(monkeypatch):
    cpu = torch.device("cpu")
    for has_bf16 in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda has=has_bf16: has)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
        reason = linear.slow_dtype_reason(torch.bfloat16, cpu)
        assert (reason is None) == has_bf16
        assert linear.slow_dtype_reason(torch.float32, cpu) is None
    assert "float32" in reason
    assert linear.slow_dtype_reason(torch.bfloat16, torch.device("cuda")) is None  # only CPUs are judged


def test_llm_warns_before_loading_a_bf16_model_on_such_a_cpu(monkeypatch):
    import pytest

    from kvcache.api import llm as llm_mod

    monkeypatch.setattr(llm_mod, "slow_dtype_reason", lambda dtype, device: "slow here; use dtype='float32'.")
    monkeypatch.setattr(llm_mod, "load_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.warns(RuntimeWarning, match="use dtype='float32'"), pytest.raises(RuntimeError, match="stop"):
        llm_mod.LLM("anything", dtype="bfloat16", progress=False)
