"""Where a weight quantization's quality cost comes from: its weights' rounding, the
activations' rounding in the integer kernels, or both.

One forward pass over the first `--context` (1024) tokens of the eval corpus, no cache, float32,
for each row below; reported: the mean KL divergence of its next-token distributions from the
float model's (nats per position) and its perplexity against the float model's.

- `none`: the GGUF dequantized to float (the reference).
- `gguf`: the file's own codes in the integer kernels. Its weights are exactly `none`'s values,
  so its cost is the kernels' activation quantization (per row and block of 32, int8) alone.
- `int8 weights, nearest` / `int4 weights`: float activations over the weights after a round
  trip through our int8 (per output row, each weight to its nearest step) or int4 (groups of
  32) packing, the embedding / output head through theirs (`weight_packing.quantize_table`):
  their rounding alone.
- `int8 weights`: the same for the int8 codes a load computes, each projection's rounding
  compensated against the model's own activations over its calibration tokens
  (`models.calibrated_int8`).
- `int8, one activation digit`: the integer kernels over those codes, each activation in one
  int8 digit per block of 32 (as `gguf` and `int4` run) instead of int8's two.
- `int8` / `int4`: the integer kernels over those codes as the quantizations run: both together.
- `int8 weights, blocks of 32`: the layers' matrices in symmetric int8 with one fp16 scale per
  row and block of 32 (GGUF's Q8_0, `weight_packing.quantize_q8_blocks`) instead of per row:
  what finer scales would save.

    python benchmarks/bench_quantization_error.py --threads 2             # the measured run
    python benchmarks/bench_quantization_error.py --context 128 --no-record  # seconds

Each run writes its record to `--record-dir` (default benchmarks/results; `none` is the baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from kvcache.bench import record
from kvcache.bench.common import consoles, run_main
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL

ROWS = ("gguf", "int8 weights, nearest", "int8 weights", "int8, one activation digit", "int8",
        "int8 weights, blocks of 32", "int4 weights", "int4")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The quality cost of weight quantization, weights vs activations.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a GGUF model (default {DEFAULT_MODEL})")
    p.add_argument("--context", type=int, default=1024, help="tokens of the eval corpus (default 1024)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    record.add_arguments(p)
    args = p.parse_args(argv)
    if args.context < 2 or args.threads < 1:
        p.error("--context must be at least 2 and --threads at least 1")
    args.record_folder = record.parse_folder(p, args)
    return args


def round_trip(sd: dict, how: str) -> dict:
    """A float state dict whose matrices went through `how`'s packing and back."""
    from kvcache.models.weight_packing import (dequantize, quantize_int4, quantize_int8, quantize_q8_blocks,
                                               quantize_table)

    quantize = {"int8": quantize_int8, "int4": quantize_int4, "block32": quantize_q8_blocks}[how]
    out = {}
    for name, w in sd.items():
        if w.dim() != 2:
            out[name] = w
        elif "embed_tokens" in name or name == "lm_head.weight":  # packed as int8 / int4 pack them
            out[name] = dequantize(quantize_table(w))
        else:
            out[name] = dequantize(quantize(w))
    return out


@contextmanager
def one_activation_digit(model):
    """`model`'s projections and head quantize each activation to one int8 digit, inside the block
    (the fused decode table keeps its own count: for uncached forwards like this script's only)."""
    lins = [lin for lw in model.layers for lin in lw.linears()] + [model.lm_head]
    before = [lin.activation_digits for lin in lins]
    for lin in lins:
        lin.activation_digits = 1
    try:
        yield
    finally:
        for lin, d in zip(lins, before):
            lin.activation_digits = d


def dequantized_state(model, sd: dict) -> dict:
    """`sd` with the layers' matrices replaced by `model`'s packed projections dequantized to float32."""
    import torch

    c = model.config
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    out = dict(sd)
    for i, lw in enumerate(model.layers):
        p = f"model.layers.{i}."
        parts = {"self_attn.q_proj": (lw.qkv, 0, q), "self_attn.k_proj": (lw.qkv, q, kv),
                 "self_attn.v_proj": (lw.qkv, q + kv, kv), "self_attn.o_proj": (lw.o, 0, c.hidden_size),
                 "mlp.gate_proj": (lw.gate_up, 0, inter), "mlp.up_proj": (lw.gate_up, inter, inter),
                 "mlp.down_proj": (lw.down, 0, c.hidden_size)}
        for name, (lin, lo, n) in parts.items():
            out[p + name + ".weight"] = lin.dequantize(torch.float32)[lo: lo + n]
    return out


def main(argv: list[str] | None = None) -> dict:
    import torch

    from kvcache.eval.corpus import corpus_token_ids
    from kvcache.models.llama import LlamaModel
    from kvcache.models.loader import gguf_file, load_model
    from kvcache.models.step import StepInputs

    from kvcache.models.calibrated_int8 import calibration_ids

    args = parse_args(argv)
    if gguf_file(args.model) is None:
        raise KVCacheError(f"{args.model} is not a GGUF model; this benchmark compares a GGUF's formats.")
    console, err = consoles(args.json, width=120)
    torch.set_num_threads(args.threads)
    float_loaded = load_model(args.model, progress=False)
    cfg, float_sd = float_loaded.config, float_loaded.state_dict
    ids = torch.tensor([corpus_token_ids(float_loaded.tokenizer, args.context)])  # (1, T)
    step = StepInputs(ids, None, 0, None, logits_for="all")

    def build(sd, quantization: str = "none") -> LlamaModel:
        cal = calibration_ids(float_loaded.tokenizer) if quantization == "int8" else None
        return LlamaModel.from_state_dict(cfg, sd, torch.float32, "cpu", quantization=quantization, calibration_ids=cal)

    def log_probs(model: LlamaModel) -> torch.Tensor:
        with torch.no_grad():
            return model.forward(step, None)[0].log_softmax(-1)  # (T, V)

    def nll(lp: torch.Tensor) -> float:
        return -lp[:-1].gather(1, ids[0, 1:, None]).mean().item()

    ref = log_probs(build(float_sd))
    int8 = build(float_sd, "int8")
    rows = {"none": {"kl": 0.0, "perplexity": float(torch.tensor(nll(ref)).exp())}}
    for name in ROWS:
        if name == "gguf":
            lp = log_probs(build(load_model(args.model, progress=False, quantization="gguf").state_dict, "gguf"))
        elif name == "int8":
            lp = log_probs(int8)
        elif name == "int4":
            lp = log_probs(build(float_sd, "int4"))
        elif name == "int8 weights":
            lp = log_probs(build(dequantized_state(int8, float_sd)))
        elif name == "int8, one activation digit":
            with one_activation_digit(int8):
                lp = log_probs(int8)
        else:
            how = {"int8 weights, nearest": "int8", "int8 weights, blocks of 32": "block32", "int4 weights": "int4"}
            lp = log_probs(build(round_trip(float_sd, how[name])))
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        rows[name] = {"kl": kl, "perplexity": float(torch.tensor(nll(lp)).exp())}
        rows[name]["vs_none"] = rows[name]["perplexity"] / rows["none"]["perplexity"] - 1
        err.print(f"{name}: KL {kl:.5f}, perplexity {rows[name]['perplexity']:.4f} ({rows[name]['vs_none']:+.2%})")
    from rich.table import Table

    t = Table(title=f"Where quantization error comes from: {args.model}, {args.context} tokens, float32")
    for c in ("weights", "KL vs none (nats/token)", "perplexity", "vs none"):
        t.add_column(c, justify="left" if c == "weights" else "right")
    for name, r in rows.items():
        t.add_row(name, f"{r['kl']:.5f}", f"{r['perplexity']:.4f}", f"{r.get('vs_none', 0.0):+.2%}")
    console.print(t)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    record.save("bench_quantization_error", "python benchmarks/bench_quantization_error.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args), results=rows,
                timings={k: v for k, v in rows.items() if k != "none"}, baseline_timings={"none": rows["none"]})
    return rows


if __name__ == "__main__":
    run_main(main)
