"""Every KV object that reaches `LlamaModel.forward` implements the declared `StepKV` protocol.

The forward pass is wrapped to record what it is handed while the engine runs each kind of
step (dense, policy cache, paged decode, mixed decode + prompt, sinks, per-request rows), so a
new KV layout that misses a member of the protocol fails here, not at run time on one path.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from kvcache.cache.dense import KVCache
from kvcache.cache.policies.cache import SequenceCache
from kvcache.models.llama import LlamaModel
from kvcache.models.step import StepInputs, StepKV
from tests.helpers import greedy, paged_llm

MEMBERS = [name for name in ("length", "rotates_keys", "reserve", "observes", "observe", "write",
                             "attend", "advance", "decode_blocks")]


@pytest.fixture
def seen(monkeypatch):
    """Record the type of every cache forward is given (and check it at the call)."""
    kinds: dict[str, object] = {}
    forward = LlamaModel.forward

    def recording(self, step, cache):
        if cache is not None:
            kinds[type(cache).__name__] = cache
        return forward(self, step, cache)

    monkeypatch.setattr(LlamaModel, "forward", recording)
    return kinds


def test_the_protocol_names_what_forward_uses():
    """The members forward touches are the protocol's, no more and no fewer."""
    declared = {n for n in vars(StepKV) if not n.startswith("_")} | set(StepKV.__annotations__)
    assert declared == set(MEMBERS)
    source = inspect.getsource(LlamaModel.forward)
    used = {n for n in MEMBERS if f"cache.{n}" in source}
    assert used == set(MEMBERS), set(MEMBERS) - used
    assert "getattr(cache" not in source and "hasattr(cache" not in source


def test_every_kv_object_forward_sees_implements_the_protocol(tiny_model_dir, tiny_llm, seen):
    model = tiny_llm.model
    ids = torch.arange(3, 40)[None]  # (1, 37)
    model.forward(StepInputs(ids, None, 0, None), KVCache.for_model(model, 1, 64))  # dense
    model.forward(StepInputs(ids, None, 0, None), SequenceCache(model, "window:size=32"))
    prompts = [list(range(3, 3 + n)) for n in (40, 9, 27)]
    for policy, mixed in [("", True), ("", False), ("sinks:n_sink=4,window=32", True),
                          ("quantized:bits=4,group_size=16,residual=16", True)]:
        engine = paged_llm(tiny_model_dir, policy, blocks=32, max_num_batched_tokens=32).engine
        engine.runner.mixed_steps = mixed
        engine.run_to_completion([engine.add_request(p, greedy(6)) for p in prompts])
    assert {"KVCache", "SequenceCache", "PagedStepView", "MixedStepView", "PagedSinksStepView",
            "RowsStepView"} <= set(seen), set(seen)
    for name, cache in seen.items():
        assert isinstance(cache, StepKV), name
        assert isinstance(cache.rotates_keys, bool), name
