"""Helpers shared by the equivalence tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

NEAR_TIE = 1e-3


def assert_same_tokens(last_logits: Callable[[list[int]], torch.Tensor], prompt: list[int], ours: list[int],
                       ref: list[int], tol: float = NEAR_TIE) -> None:
    """ours == ref, or they first differ where the reference logits are a near-tie.

    `last_logits(ids)` gives the reference's logits (V,) for the next token after `ids`.
    At the first differing position i, both tokens must be within `tol` of the best logit
    for prompt + ref[:i] (so the top-2 gap is < tol); otherwise the test fails.
    """
    if ours == ref:
        return
    n = min(len(ours), len(ref))
    i = next((j for j in range(n) if ours[j] != ref[j]), n)
    assert i < n, f"one sequence is a strict prefix of the other: {len(ours)} vs {len(ref)} tokens"
    logits = last_logits(prompt + ref[:i]).float()
    best = float(logits.max())
    gap_ours, gap_ref = best - float(logits[ours[i]]), best - float(logits[ref[i]])
    top2 = logits.topk(2).values
    assert gap_ours < tol and gap_ref < tol, (
        f"tokens differ at generated position {i} ({ours[i]} vs {ref[i]}) without a near-tie: "
        f"gaps to the best logit {gap_ours:.4g} / {gap_ref:.4g}, top-2 gap {float(top2[0] - top2[1]):.4g}"
    )


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script benchmarks/NAME.py imported as the module NAME: registered in sys.modules (its
    dataclasses look their module up), with benchmarks/ on the path while it runs (scripts
    import their siblings)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def imported_top_modules(path) -> set[str]:
    """Top-level names of every module a Python file imports (from its syntax tree)."""
    import ast
    from pathlib import Path

    tops: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            tops.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            tops.add((node.module or "").split(".")[0])
    return tops


def paged_llm(model_dir, policy: str, blocks: int, block_size: int = 16, **kw):
    """An LLM on `model_dir` (fp32, CPU) whose paged pool holds `blocks` blocks under `policy`."""
    import kvcache

    probe = kvcache.LLM(str(model_dir), progress=False, kv_policy=policy, kv_cache_memory=1 << 20)
    return kvcache.LLM(str(model_dir), dtype="float32", device="cpu", progress=False, kv_policy=policy,
                       kv_cache_memory=blocks * block_size * probe.engine_bytes_per_token, block_size=block_size,
                       **kw)


def greedy(n: int):
    """Greedy sampling of exactly n tokens (EOS ignored)."""
    from kvcache import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def random_requests(vocab: int, n: int, seed: int, shared: int, shares, prompt: tuple[int, int],
                    new: tuple[int, int]):
    """n greedy requests of random ids: a `shared`-id prefix for the requests i with shares(i),
    then randint(*prompt) ids each; randint(*new) new tokens each (deterministic for `seed`)."""
    import random

    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    prefix = ids(shared)
    prompts = [(prefix if shares(i) else []) + ids(rng.randint(*prompt)) for i in range(n)]
    return prompts, [greedy(rng.randint(*new)) for _ in range(n)]


def policy_cache_greedy(model, policy: str, prompt: list[int], n: int, token_at_a_time: bool = False,
                        piece: int | None = None) -> list[int]:
    """Greedy tokens of one prompt on a one-sequence SequenceCache: the prompt fed a token at a
    time (no chunk effects), in pieces of `piece` tokens, or as one chunk (an eviction policy
    sees all of it), then decoded."""
    from kvcache.cache.policies.cache import SequenceCache
    from kvcache.models.step import StepInputs

    cache, out = SequenceCache(model, policy), []
    step = 1 if token_at_a_time else piece or len(prompt)
    with torch.inference_mode():
        pieces = [prompt[i : i + step] for i in range(0, len(prompt), step)]
        for piece in pieces:
            logits = model.forward(StepInputs(torch.tensor([piece]), None, cache.next_position, None), cache)
        for _ in range(n):
            out.append(int(logits[0].argmax()))
            logits = model.forward(StepInputs(torch.tensor([[out[-1]]]), None, cache.next_position, None), cache)
    return out


def dense_greedy(model, prompt: list[int], n: int, stop_ids=()) -> list[int]:
    """Greedy tokens on the model's dense `KVCache`: the prompt as one chunk, then one token a
    step; at most n, ending after a token in `stop_ids` (the engine-free path the engine's are
    checked against)."""
    from kvcache.cache.dense import KVCache
    from kvcache.models.step import StepInputs

    cache, out = KVCache.for_model(model, 1, len(prompt) + n), []
    with torch.inference_mode():
        logits = model.forward(StepInputs(torch.tensor([prompt]), None, 0, None), cache)
        while True:
            out.append(int(logits[0].argmax()))
            if len(out) == n or out[-1] in stop_ids:
                return out
            logits = model.forward(StepInputs(torch.tensor([[out[-1]]]), None, cache.next_position, None), cache)


def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens with no KV cache at all: every step runs the whole sequence from its first token."""
    from kvcache.models.step import StepInputs

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model.forward(StepInputs(torch.tensor([ids]), None, 0, None), None)[0].argmax()))
    return ids[len(prompt):]


#: Byte offsets of the fp16 super-block scales in each K-quant block (ggml's block layouts).
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def k_quant_blocks(rows: int, cols: int, qtype: str, seed: int = 0):
    """Valid K-quant bytes (rows, cols/256 blocks) of random codes and sub-scales, their fp16
    super-block scales set to small positive values (random bytes could be NaN)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for at in K_QUANT_SCALES[qtype]:
        raw[:, :, at:at + 2] = rng.uniform(0.001, 0.01, (rows, cols // 256, 1)).astype("<f2").view(np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path, tensors: dict, heads: int = 4, kv_heads: int = 2, metadata: dict | None = None):
    """A llama-architecture GGUF with these tensors: name -> (float array, type name); `metadata`:
    more uint32 keys (e.g. "llama.block_count")."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.attention.head_count", heads)
    writer.add_uint32("llama.attention.head_count_kv", kv_heads)
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(300)])  # string arrays are skipped
    for name, (arr, qtype) in tensors.items():
        if qtype in ("F32", "F16"):
            writer.add_tensor(name, arr.astype(np.float32 if qtype == "F32" else np.float16))
        elif qtype in K_QUANT_SCALES:  # no numpy quantizer: random blocks (`k_quant_blocks`)
            writer.add_tensor(name, k_quant_blocks(arr.shape[0], arr.shape[1], qtype), raw_dtype=T[qtype])
        else:
            writer.add_tensor(name, gguf.quants.quantize(arr, T[qtype]), raw_dtype=T[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_quantized_gguf(path, tied: bool):
    """A 2-layer GGUF (hidden 64, 4 heads and 2 KV heads of 16, intermediate 96, vocab 300) whose
    matrices mix Q4_1, Q4_0, Q8_0 and one F16; the token embedding F16 when `tied` (no
    output.weight), else Q8_0 beside a Q8_0 output head. Returns `path`."""
    import numpy as np

    rng = np.random.default_rng(2)

    def m(rows, cols):
        return rng.standard_normal((rows, cols)).astype(np.float32)

    ones = (np.ones(64, np.float32), "F32")
    t = {"token_embd.weight": (m(300, 64), "F16" if tied else "Q8_0"), "output_norm.weight": ones}
    if not tied:
        t["output.weight"] = (m(300, 64), "Q8_0")
    for n in range(2):
        b = f"blk.{n}."
        t |= {b + "attn_q.weight": (m(64, 64), "Q4_1"), b + "attn_k.weight": (m(32, 64), "Q4_0"),
              b + "attn_v.weight": (m(32, 64), "Q8_0"), b + "attn_output.weight": (m(64, 64), "Q4_1"),
              b + "ffn_gate.weight": (m(96, 64), "Q4_1"), b + "ffn_up.weight": (m(96, 64), "F16"),
              b + "ffn_down.weight": (m(64, 96), "Q4_0"), b + "attn_norm.weight": ones, b + "ffn_norm.weight": ones}
    write_gguf(path, t, metadata={"llama.embedding_length": 64, "llama.feed_forward_length": 96,
                                  "llama.block_count": 2, "llama.context_length": 128})
    return path


#: hidden, intermediate, vocab, heads, KV heads, head dim of `write_tiny_packed_gguf`
PACKED_SHAPE = (64, 96, 300, 4, 2, 16)


def write_tiny_packed_gguf(path, matrix_type: str = "Q4_1", tied: bool = True, up_type: str | None = None,
                           extra: dict | None = None):
    """A 2-layer GGUF of `PACKED_SHAPE` whose matrices are all packed (Q4_1 / Q4_0 / Q8_0; `up_type`
    overrides ffn_up; `extra`: more tensors, name -> (array, type))."""
    import numpy as np

    H, I, V, HEADS, KV_HEADS, D = PACKED_SHAPE
    rng = np.random.default_rng(5)

    def m(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.5).astype(np.float32)

    norm = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    t = {"token_embd.weight": (m(V, H), "Q8_0"), "output_norm.weight": (norm, "F32")}
    if not tied:
        t["output.weight"] = (m(V, H), "Q8_0")
    for n in range(2):
        b = f"blk.{n}."
        t |= {b + "attn_q.weight": (m(HEADS * D, H), matrix_type), b + "attn_k.weight": (m(KV_HEADS * D, H), matrix_type),
              b + "attn_v.weight": (m(KV_HEADS * D, H), matrix_type), b + "attn_output.weight": (m(H, H), "Q4_0"),
              b + "ffn_gate.weight": (m(I, H), "Q8_0"), b + "ffn_up.weight": (m(I, H), up_type or "Q8_0"),
              b + "ffn_down.weight": (m(H, I), "Q4_1"), b + "attn_norm.weight": (norm, "F32"),
              b + "ffn_norm.weight": (norm, "F32")}
    write_gguf(path, t | (extra or {}), heads=HEADS, kv_heads=KV_HEADS)
    return path


def feed(model, cache, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits (T, V) for every position, feeding `ids` through `cache` in chunks."""
    from kvcache.models.step import StepInputs

    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            x = torch.tensor([ids[i : i + chunk]])  # (1, T)
            out.append(model.forward(StepInputs(x, None, cache.next_position, None, "all"), cache)[0])
    return torch.cat(out)  # (T, V)


def quantize_activations(x: torch.Tensor, digits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: per row and block of 32, scale amax/127, codes round-half-even(x * 127/amax);
    with digits=2 each row is followed by its residual x - scale * codes quantized alike."""
    m, k = x.shape
    nb = -(-k // 32)
    xf = torch.zeros(m, nb * 32)
    xf[:, :k] = x.float()
    g = xf.view(m, nb, 32)
    out_codes, out_scales = [], []
    for _ in range(digits):
        amax = g.abs().amax(-1)  # (M, nb)
        # 127 / amax as the kernel divides: torch computes `127 / t` as t.reciprocal() * 127, which
        # rounds differently and flips a code that lands next to .5 in about one prompt of 15
        inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
        codes = (g * inv[..., None]).round()  # (M, nb, 32)
        out_codes.append(codes.reshape(m, nb * 32))
        out_scales.append(amax / 127)
        g = (g.double() - (amax / 127).double()[..., None] * codes.double()).float()  # the residual
    # rows interleaved as the kernel holds them: row r's digits at r * digits + 0, 1, ...
    return torch.stack(out_codes, 1).view(m * digits, nb * 32), torch.stack(out_scales, 1).view(m * digits, nb)


def rounded_activations(x: torch.Tensor, digits: int = 1) -> torch.Tensor:
    """The values the kernel's `digits` int8 digits carry for x (M, K): their sum, in float64."""
    codes, scale = quantize_activations(x, digits)
    xdq = (codes.double().view(codes.shape[0], -1, 32) * scale.double()[..., None]).view(x.shape[0], digits, -1)
    return xdq.sum(1)[:, : x.shape[1]]  # (M, K)
