"""Decode speed at a long context: ours under a KV policy, and `transformers` with its own caches.

Ours: prefill `context` tokens of the corpus through a policy cache (or take a cache a
perplexity pass already filled), one warm-up step, then `repeats` runs of `steps` greedy
decode steps back to back (each continues the sequence); tok/s = steps / time, median.

Theirs: the same weights (`AutoModelForCausalLM.from_pretrained(llm.model_dir)`, same
dtype), the context prefilled once into a `DynamicCache` or a `QuantizedCache`, then
`generate(..., cache=..., max_new_tokens=steps, min_new_tokens=steps, do_sample=False)`
`repeats` times back to back, each continuing from the last one's output. Their
`QuantizedCache` needs a backend package: optimum-quanto (pinned in the `eval` extra;
int4 / int2) or HQQ; when neither imports, the result says so instead of a number.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from kvcache.eval.corpus import corpus_token_ids
from kvcache.models.step import StepInputs


@dataclass
class SpeedResult:
    name: str  # a policy string, or "hf:dynamic" / "hf:quantized-quanto-int4"
    context: int  # tokens in the cache when timing starts (seen)
    tok_s: float | None  # median decode tokens per second
    runs: list[float] = field(default_factory=list)  # tok/s of each repeat
    note: str = ""  # why there is no number, or what was used


def _median_rate(run_once, steps: int, repeats: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        run_once()
        rates.append(steps / (time.perf_counter() - t))
    return statistics.median(rates), rates


def prefill(llm, kv_policy: str | None, context: int, chunk: int = 512):
    """A policy cache holding `context` corpus tokens (prefilled in chunks), and the last logits."""
    ids = torch.tensor([corpus_token_ids(llm.tokenizer, context)], device=llm.device)  # (1, T)
    cache = llm.new_policy_cache(kv_policy)
    with torch.inference_mode():
        for start in range(0, context, chunk):
            logits = llm.model.forward(StepInputs(ids[:, start : start + chunk], None, cache.next_position, None),
                                       cache)  # (1, V)
    return cache, logits


def decode_speed(llm, kv_policy: str | None = None, context: int = 4096, steps: int = 32, repeats: int = 3,
                 cache=None, first_token: int | None = None) -> SpeedResult:
    """Greedy decode tok/s after `context` tokens, or continuing a filled `cache` from `first_token`."""
    if cache is None:
        cache, logits = prefill(llm, kv_policy, context)
        first_token = int(logits[0].argmax())
    model, dev = llm.model, llm.device
    token = torch.tensor([[first_token]], device=dev)  # (1, 1)
    seen = cache.seen
    state = {"token": token}

    def step_n(n: int) -> None:
        tok = state["token"]
        for _ in range(n):
            out = model.forward(StepInputs(tok, None, cache.next_position, None), cache)  # (1, V)
            tok = out.argmax(-1, keepdim=True)  # (1, 1)
        state["token"] = torch.tensor([[int(tok)]], device=dev)  # the host sync a real decode loop has

    with torch.inference_mode():
        step_n(1)  # warm-up
        rate, runs = _median_rate(lambda: step_n(steps), steps, repeats)
    name = kv_policy if kv_policy is not None else cache.spec.text
    return SpeedResult(name, seen, rate, runs)


def load_hf_model(llm):
    """`transformers`' own model on the same weights and dtype."""
    from transformers import AutoModelForCausalLM

    from kvcache.bench.common import quiet_transformers

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(str(llm.model_dir), dtype=llm.dtype).to(llm.device).eval()


def hf_quantized_cache(config, nbits: int = 4):
    """(QuantizedCache, backend name), or (None, reason) when no backend imports."""
    from transformers import QuantizedCache

    reasons = []
    for backend in ("quanto", "hqq"):
        try:
            return QuantizedCache(backend, config, nbits=nbits), backend
        except (ImportError, ValueError) as exc:
            reasons.append(f"{backend}: {str(exc).splitlines()[0]}")
    return None, "no QuantizedCache backend could be used (" + "; ".join(reasons) + ")"


def hf_decode_speed(llm, hf_model, kind: str = "dynamic", context: int = 4096, steps: int = 32, repeats: int = 3,
                    nbits: int = 4) -> SpeedResult:
    """`transformers` generate tok/s after `context` tokens with its DynamicCache or QuantizedCache."""
    from transformers import DynamicCache

    name = f"hf:{kind}"
    if kind == "dynamic":
        cache = DynamicCache(config=hf_model.config)
    else:
        cache, backend = hf_quantized_cache(hf_model.config, nbits)
        if cache is None:
            return SpeedResult(name, context, None, note=backend)
        name = f"hf:quantized-{backend}-int{nbits}"
    ids = torch.tensor([corpus_token_ids(llm.tokenizer, context + 1)], device=llm.device)  # (1, T+1)
    pad = next(iter(llm.eos_ids), 0)
    state = {"seq": ids}
    with torch.inference_mode():
        for start in range(0, context, 512):  # the context minus its last token; generate feeds that one
            hf_model(input_ids=ids[:, start : min(start + 512, context)], cache=cache, use_cache=True)

        def generate(n: int) -> None:
            seq = state["seq"]
            state["seq"] = hf_model.generate(input_ids=seq, attention_mask=torch.ones_like(seq), cache=cache,
                                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)

        generate(1)  # warm-up
        rate, runs = _median_rate(lambda: generate(steps), steps, repeats)
    return SpeedResult(name, context, rate, runs)
