"""The fast paths the engine must take, pinned: a regression onto a slower, still correct
path (torch matmuls where native or oneDNN ones run, a gathered copy of the blocks where the
native kernel reads them in place) changes no output, so only these tests catch it."""

from __future__ import annotations

import pytest
import torch

from kvcache.native import ops as native
from kvcache.cache.dense import KVCache
from kvcache.cache.policies.cache import SequenceCache
from kvcache.models.linear import resolve_kernels
from kvcache.native import build
from tests.helpers import greedy, paged_llm

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_native = pytest.mark.skipif(not build.wanted(), reason="no C compiler on this machine, or KVCACHE_NATIVE=0")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


@pytest.mark.parametrize("dtype, bf16_matmuls, native_built, device, want", [
    (torch.bfloat16, True, True, CPU, "onednn"),  # AVX-512 BF16 / AMX: oneDNN's packed bf16 weights
    (torch.bfloat16, False, True, CPU, "torch"),  # no bf16 hardware; the native matmul is fp32 only
    (torch.float32, True, True, CPU, "native"),  # fp32 with the kernels built: the native skinny matmul
    (torch.float32, True, False, CPU, "torch"),  # no compiler
    (torch.float32, True, True, CUDA, "torch"),
    (torch.bfloat16, True, True, CUDA, "torch"),
])
def test_auto_picks_the_kernel_family_for_dtype_and_cpu_features(monkeypatch, dtype, bf16_matmuls, native_built,
                                                                 device, want):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_matmuls)
    monkeypatch.setattr(native, "_functions", lambda: {("rms_norm", torch.float32): None} if native_built else {})
    assert resolve_kernels("auto", dtype, device) == want


@needs_native
def test_an_fp32_model_on_this_cpu_runs_every_matmul_natively(tiny_llm):
    model = tiny_llm.engine.model
    assert model.native and model.lm_head.kind == "native"
    assert {lin.kind for lw in model.layers for lin in lw.linears()} == {"native"}


@needs_native
def test_every_kv_store_of_a_native_model_attends_through_the_native_backend(tiny_llm):
    """The dense cache, a policy cache and the engine's storage all get the model's backend."""
    model = tiny_llm.engine.model
    caches = [KVCache.for_model(model, 1, 8), SequenceCache(model, "quantized:bits=4,group_size=16"),
              tiny_llm.engine.storage]
    assert [c.attention.name for c in caches] == ["native-cpu"] * 3


def spy_decode(monkeypatch, llm, kernel: str) -> list[dict]:
    """Per engine step: its decode rows and prompt chunks, and how often attention called the
    native `kernel` and read the storage as a copy (`read_rows`) or a view (`read_range`)."""
    eng, storage = llm.engine, llm.engine.storage
    steps: list[dict] = []

    def counting(name, fn):
        def call(*a, **kw):
            steps[-1][name] += 1
            return fn(*a, **kw)
        return call

    monkeypatch.setattr(native, kernel, counting("kernel", getattr(native, kernel)))
    for name in ("read_rows", "read_range"):
        monkeypatch.setattr(storage, name, counting(name, getattr(storage, name)))
    step = eng.step

    def counted_step():
        steps.append(dict(kernel=0, read_rows=0, read_range=0))
        outs = step()
        chunks = eng.last_schedule.chunks
        steps[-1].update(decodes=sum(c.num_tokens == 1 for c in chunks), prompts=sum(c.num_tokens > 1 for c in chunks),
                         lengths={c.start for c in chunks if c.num_tokens == 1})
        return outs

    monkeypatch.setattr(eng, "step", counted_step)
    return steps


@needs_native
@pytest.mark.parametrize("policy, kernel", [
    ("full", "decode_attention"),
    ("quantized:bits=4,group_size=8,key_axis=token,residual=0", "paged_quantized_decode_attention"),
], ids=["float", "per-token-quantized"])
@pytest.mark.parametrize("mixed_steps", [True, False])
def test_paged_decode_reads_blocks_in_place_through_the_native_kernel(monkeypatch, tiny_model_dir, policy, kernel,
                                                                      mixed_steps):
    """Rows of unequal lengths (which torch would gather into a padded copy): every step with
    decode rows calls the native kernel once per layer, and a step of decode rows alone reads
    no block otherwise; quantized blocks are attended from their codes, never dequantized."""
    llm = paged_llm(tiny_model_dir, policy, blocks=64, block_size=4)
    llm.engine.runner.mixed_steps = mixed_steps
    assert llm.engine.storage.attention.name == "native-cpu"  # picked once, when the engine was built
    layers = llm.config.num_layers
    steps = spy_decode(monkeypatch, llm, kernel)
    llm.generate([[5, 17, 42], [61, 2, 2, 7, 30, 12, 9, 4, 8], [11, 23, 4, 99, 3, 70]], greedy(6))
    with_decodes = [s for s in steps if s["decodes"]]
    assert any(len(s["lengths"]) > 1 and not s["prompts"] for s in with_decodes), steps
    for s in with_decodes:
        assert s["kernel"] == layers, s
        if not s["prompts"]:
            assert s["read_rows"] == s["read_range"] == 0, s
