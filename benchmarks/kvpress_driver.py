"""Run NVIDIA kvpress presses over a set of long-context cases; write one JSON row per answer.

Runs INSIDE .venv-kvpress (see benchmarks/kvpress_setup.sh); it does not import kvcache, whose
transformers pin differs from kvpress's.

    .venv-kvpress/bin/python benchmarks/kvpress_driver.py --cases cases.json \\
        --presses snapkv,knorm,expected_attention,streaming_llm --ratios 0.5,0.75,0.875 \\
        --out results.json [--max-new-tokens 16] [--threads 2] [--layout layout.json]

cases.json: {"model_dir": str, "template": str, "cases": [{"id", "context", "question",
"answer", "length", "depth"}]}. results.json: a list of {"press", "ratio", "id", "output",
"correct", "seconds", "context_tokens"}; `correct` = the answer string occurs in the output
(case-sensitive, the answer stripped of surrounding spaces). The file is rewritten after every
answer, so a run cut short keeps what it finished. Press "none" is the uncompressed baseline
(run once, ratio 0.0). The model is loaded from model_dir in float32 on the CPU.

What the model sees (kvpress 0.5.5's KVPressTextGenerationPipeline, used unchanged; the
`template` field of cases.json is recorded but not used: the layout is kvpress's):

1. The chat template is applied to ONE user message whose content is the context followed by a
   separator, with add_generation_prompt=True; the text is split at the separator:

       context_text  = render([{"role": "user", "content": context + SEP}])  before SEP
       question_text = question + (render(...) after SEP)

   For SmolLM2-Instruct (whose template adds a default system message) that is, exactly:

       context_text  = "<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
                       "Hugging Face<|im_end|>\\n<|im_start|>user\\n" + context
       question_text = question + "<|im_end|>\\n<|im_start|>assistant\\n"

   Nothing is inserted between context and question: put any separator ("\\n\\n") in the case
   text itself. A tokenizer without a chat template gets bos + context, and question + "\\n".
2. The two texts are tokenized SEPARATELY (add_special_tokens=False), so the token boundary
   falls exactly between context and question.
3. Prefill of the context tokens runs under the press, which compresses their KV cache by
   `ratio` (the fraction removed) in every layer; the whole context_text is compressible,
   system prompt and "<|im_start|>user\\n" included. The question is NOT seen by the press:
   query-aware presses (snapkv...) score with the context's own last queries.
4. The question tokens are then run at positions context_len .. context_len+q-1 (the
   original positions, not the compressed length), and greedy decoding follows (argmax, no
   sampling) for at most --max-new-tokens tokens, stopping at the model's eos token. The
   output is decoded with skip_special_tokens=True.

--layout writes, per case, the two texts as the pipeline tokenizes them (decoded back from its
token ids) and their token counts, so another engine can be given exactly the same input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PRESSES = {  # name -> kvpress class name; each takes compression_ratio (the fraction removed)
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "streaming_llm": "StreamingLLMPress",
    "tova": "TOVAPress",
    "random": "RandomPress",
    "pyramidkv": "PyramidKVPress",
    "keydiff": "KeyDiffPress",
    "lagkv": "LagKVPress",
}
BASELINE = "none"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", required=True, type=Path, help="cases.json (see the module docstring)")
    p.add_argument("--presses", default="snapkv,knorm,expected_attention,streaming_llm",
                   help=f"comma-separated: {', '.join([BASELINE, *PRESSES])}")
    p.add_argument("--ratios", default="0.5,0.75,0.875", help="fractions of the context KV removed, comma-separated")
    p.add_argument("--out", required=True, type=Path, help="results.json to write")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--model-dir", default=None, help="overrides cases.json's model_dir")
    p.add_argument("--layout", type=Path, default=None, help="also write what the model sees per case, as JSON")
    args = p.parse_args(argv)
    args.presses = [s.strip() for s in args.presses.split(",") if s.strip()]
    unknown = [s for s in args.presses if s != BASELINE and s not in PRESSES]
    if unknown:
        p.error(f"unknown press {', '.join(unknown)}; known: {', '.join([BASELINE, *PRESSES])}")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios must be numbers, got {args.ratios!r}")
    if not args.ratios or any(not 0.0 <= r < 1.0 for r in args.ratios):
        p.error("--ratios must be fractions in [0, 1)")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


def load_cases(path: Path) -> dict:
    data = json.loads(path.read_text())
    for key in ("model_dir", "cases"):
        if key not in data:
            raise SystemExit(f"{path}: missing key {key!r}")
    for i, case in enumerate(data["cases"]):
        missing = [k for k in ("id", "context", "question", "answer") if k not in case]
        if missing:
            raise SystemExit(f"{path}: case {i} lacks {', '.join(missing)}")
    return data


def runs(presses: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(press, ratio) pairs; the baseline runs once."""
    return [(name, 0.0) if name == BASELINE else (name, r) for name in presses
            for r in ([0.0] if name == BASELINE else ratios)]


def make_press(name: str, ratio: float):
    import kvpress

    if name == BASELINE:
        return None
    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio)


def layout(pipe, case: dict) -> dict:
    """The context and question exactly as kvpress's pipeline tokenizes them."""
    ids = pipe.preprocess(case["context"], questions=[case["question"]], answer_prefix="",
                          max_context_length=int(1e10))
    ctx, q = ids["context_ids"][0], ids["questions_ids"][0][0]
    tok = pipe.tokenizer
    return {"id": case["id"], "context_text": tok.decode(ctx), "question_text": tok.decode(q),
            "context_tokens": int(ctx.numel()), "question_tokens": int(q.numel())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_cases(args.cases)
    model_dir = args.model_dir or data["model_dir"]

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from transformers.utils import logging as hf_logging

    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)

    hf_logging.disable_progress_bar()  # one progress bar: ours
    hf_logging.set_verbosity_error()

    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    console.print(f"loaded {model_dir} in {time.perf_counter() - t0:.1f}s; {len(data['cases'])} cases")

    layouts = {case["id"]: layout(pipe, case) for case in data["cases"]}
    if args.layout:
        args.layout.write_text(json.dumps(list(layouts.values()), indent=1, ensure_ascii=False))

    plan = runs(args.presses, args.ratios)
    results: list[dict] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("kvpress", total=len(plan) * len(data["cases"]))
        for name, ratio in plan:
            for case in data["cases"]:
                progress.update(task, description=f"{name} {ratio:g} {case['id']}")
                start = time.perf_counter()
                with torch.inference_mode():
                    output = pipe(case["context"], question=case["question"], press=make_press(name, ratio),
                                  max_new_tokens=args.max_new_tokens)["answer"]
                results.append({
                    "press": name, "ratio": ratio, "id": case["id"], "output": output,
                    "correct": str(case["answer"]).strip() in output,
                    "seconds": round(time.perf_counter() - start, 3),
                    "context_tokens": layouts[case["id"]]["context_tokens"],
                })
                args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
                progress.advance(task)

    for name, ratio in plan:
        rows = [r for r in results if r["press"] == name and r["ratio"] == ratio]
        acc = sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
        secs = sum(r["seconds"] for r in rows) / len(rows) if rows else 0.0
        console.print(f"{name:>20} ratio {ratio:<6g} accuracy {acc:.3f}  {secs:.2f}s/case")
    console.print(f"wrote {len(results)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
