"""Where a weight quantization's quality cost comes from: its weights' rounding, the
activations' rounding in the integer kernels, or both.

One forward pass over the first `--context` (1024) tokens of the eval corpus, no cache, float32,
for each row below; reported: the mean KL divergence of its next-token distributions from the
float model's (nats per position) and its perplexity against the float model's.

- `none`: the GGUF dequantized to float (the reference).
- `gguf`: the file's own codes in the integer kernels. Its weights are exactly `none`'s values,
  so its cost is the kernels' activation quantization (per row and block of 32, int8) alone.
- `int8 weights` / `int4 weights`: float activations over the weights after a round trip
  through our int8 (per output row) or int4 (groups of 32) packing, the embedding / output head
  through theirs (`weight_packing.quantize_table`): their rounding alone.
- `int8` / `int4`: the integer kernels over those codes: both together.
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

from kvcache.bench import record
from kvcache.bench.common import consoles, run_main
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL

ROWS = ("gguf", "int8 weights", "int8", "int8 weights, blocks of 32", "int4 weights", "int4")


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


def main(argv: list[str] | None = None) -> dict:
    import torch

    from kvcache.eval.corpus import corpus_token_ids
    from kvcache.models.llama import LlamaModel
    from kvcache.models.loader import gguf_file, load_model
    from kvcache.models.step import StepInputs

    args = parse_args(argv)
    if gguf_file(args.model) is None:
        raise KVCacheError(f"{args.model} is not a GGUF model; this benchmark compares a GGUF's formats.")
    console, err = consoles(args.json, width=120)
    torch.set_num_threads(args.threads)
    float_loaded = load_model(args.model, progress=False)
    cfg, float_sd = float_loaded.config, float_loaded.state_dict
    ids = torch.tensor([corpus_token_ids(float_loaded.tokenizer, args.context)])  # (1, T)
    step = StepInputs(ids, None, 0, None, logits_for="all")

    def log_probs(sd, quantization: str = "none") -> torch.Tensor:
        model = LlamaModel.from_state_dict(cfg, sd, torch.float32, "cpu", quantization=quantization)
        with torch.no_grad():
            return model.forward(step, None)[0].log_softmax(-1)  # (T, V)

    def nll(lp: torch.Tensor) -> float:
        return -lp[:-1].gather(1, ids[0, 1:, None]).mean().item()

    ref = log_probs(float_sd)
    rows = {"none": {"kl": 0.0, "perplexity": float(torch.tensor(nll(ref)).exp())}}
    for name in ROWS:
        if name == "gguf":
            lp = log_probs(load_model(args.model, progress=False, quantization="gguf").state_dict, "gguf")
        elif name in ("int8", "int4"):
            lp = log_probs(float_sd, name)
        else:
            lp = log_probs(round_trip(float_sd, "block32" if "blocks" in name else name.split()[0]))
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
