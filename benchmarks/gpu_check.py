"""Everything GPU-side in one run (`scripts/gpu_check.sh` calls it): our engine on CUDA (Triton
attention over the paged blocks) against `transformers` on the same GPU, same weights, same dtype.

1. Equivalence: a real-text prompt, greedy tokens from our engine (paged blocks, mixed steps,
   Triton decode and prompt-chunk kernels); `transformers` scores prompt + our tokens in one
   forward. Logits: our dense-cache forward (prompt in one pass, then one token a step through
   the Triton decode kernel) vs theirs, max |difference| absolute and relative to the largest
   logit; the engine's sampled-token logprobs vs theirs; greedy tokens vs their argmax at every
   step, a mismatch allowed only where their top two logits are within `--tie` (a near-tie).
2. Batch-1 speed: prefill tok/s (prompt / time to first token) and decode tok/s (tokens after
   the first / their time), ours vs `transformers` generate (static cache off, its default),
   medians over `--repeats`; decode's weight bytes per token x tok/s as a fraction of the GPU's
   memory bandwidth (`--bandwidth-gbs`, else a table of known GPUs).
3. The 64-request workload of benchmarks/bench_throughput.py (lognormal prompt and output
   lengths, real text, greedy, EOS ignored): ours (`LLM.generate`, continuous batching) vs
   `transformers`' continuous batching (the manager behind `generate_batch`, each request with
   its own `max_new_tokens`), wall time and tokens/s.

One JSON record (`kvcache.bench.record`) holds every figure. `--device cpu` with a tiny model
folder is a dry run of the same code (the tests do that); figures only mean something on CUDA.

    python benchmarks/gpu_check.py                        # on a GPU machine (scripts/gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --model TINY_DIR --prompt-tokens 16 --new-tokens 4 \\
        --num-requests 3 --max-prompt 32 --max-output 8 --no-record
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_throughput's workload, run from anywhere

from bench_throughput import make_workload  # noqa: E402

from kvcache.api.llm import LLM, parse_dtype  # noqa: E402
from kvcache.bench import record  # noqa: E402
from kvcache.bench.common import corpus_ids, require_at_least_one  # noqa: E402
from kvcache.cache.dense import KVCache  # noqa: E402
from kvcache.engine.sampling import SamplingParams  # noqa: E402
from kvcache.models.loader import DEFAULT_MODEL  # noqa: E402
from kvcache.models.step import StepInputs  # noqa: E402

# peak memory bandwidth, GB/s, by a substring of torch.cuda.get_device_name (first match wins)
GPU_BANDWIDTH_GBS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935,
                     "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "A10": 600, "RTX 4090": 1008, "T4": 320}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Our engine on CUDA vs transformers: equivalence, batch-1, 64 requests.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (a dry run) (default cuda)")
    p.add_argument("--dtype", default="bfloat16", help="weights and KV dtype (default bfloat16)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="batch-1 and equivalence prompt (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="batch-1 generated tokens (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="batch-1 timed runs per side (default 3)")
    p.add_argument("--tie", type=float, default=0.125,
                   help="a greedy mismatch is a near-tie when their top two logits are this close (default 0.125, "
                        "one bf16 step at 16-32)")
    p.add_argument("--num-requests", type=int, default=64, help="workload requests (default 64)")
    p.add_argument("--max-prompt", type=int, default=1024, help="workload: longest prompt (default 1024)")
    p.add_argument("--max-output", type=int, default=256, help="workload: longest output (default 256)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--kv-cache-memory", default="4GiB", help="our KV pool (default 4GiB)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="our tokens per step (default 2048)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="the GPU's memory bandwidth (default: by name)")
    p.add_argument("--hf-num-blocks", type=int, default=None,
                   help="transformers' continuous batching: KV blocks (default: its own sizing from free memory)")
    p.add_argument("--skip-workload", action="store_true", help="skip section 3")
    record.add_arguments(p)
    args = p.parse_args(argv)
    require_at_least_one(p, args, ("prompt_tokens", "repeats", "num_requests", "max_prompt", "max_output"))
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed excludes the first token)")
    try:
        args.torch_dtype = parse_dtype(args.dtype)
    except ValueError as exc:
        p.error(str(exc))
    args.folder = record.parse_folder(p, args)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_info(device: torch.device, bandwidth_gbs: float | None) -> dict:
    """The accelerator: name, memory, the bandwidth the fraction is taken against (None when unknown)."""
    if device.type != "cuda":
        return {"name": "cpu (dry run)", "memory_bytes": None, "bandwidth_gbs": bandwidth_gbs}
    props = torch.cuda.get_device_properties(device)
    name = props.name
    known = next((bw for key, bw in GPU_BANDWIDTH_GBS.items() if key in name), None)
    return {"name": name, "memory_bytes": props.total_memory, "bandwidth_gbs": bandwidth_gbs or known,
            "capability": list(torch.cuda.get_device_capability(device)), "torch_cuda": torch.version.cuda}


def greedy(n: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def our_logits(llm: LLM, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Our logits (len(ids) - 1, V) fp32 predicting tokens 1.. of ids: the prompt in one pass
    over a dense cache, then one token a step (the backend's decode kernel)."""
    model = llm.model
    dev = model.device
    cache = KVCache.for_model(model, 1, len(ids))
    rows = []
    with torch.inference_mode():
        prompt = torch.tensor([ids[:n_prompt]], device=dev)  # (1, P)
        rows.append(model.forward(StepInputs(prompt, None, 0, None, logits_for="all"), cache)[0].float())  # (P, V)
        for i in range(n_prompt, len(ids) - 1):
            step = StepInputs(torch.tensor([[ids[i]]], device=dev), None, i, None)
            rows.append(model.forward(step, cache).float())  # (1, V)
    return torch.cat(rows)  # (len - 1, V)


def equivalence(llm: LLM, hf, prompt: list[int], n_new: int, tie: float) -> dict:
    out = llm.generate([prompt], greedy(n_new, logprobs=1))[0]
    ours_tokens = list(out.token_ids)
    ids = prompt + ours_tokens
    dev = llm.device
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids], device=dev)).logits[0, :-1].float()  # (len - 1, V)
    ours = our_logits(llm, ids, len(prompt))
    diff = (ours - theirs).abs()
    gen = theirs[len(prompt) - 1:]  # (n_new, V): their logits at each of our generated tokens
    top2 = gen.topk(2, -1).values  # (n_new, 2)
    argmax = gen.argmax(-1).tolist()
    mismatches = [i for i, (a, b) in enumerate(zip(ours_tokens, argmax)) if a != b]
    ties = [i for i in mismatches if float(top2[i, 0] - top2[i, 1]) <= tie]
    their_lp = gen.log_softmax(-1)
    engine_lp = [abs(lp.logprob - float(their_lp[i, lp.token_id])) for i, lp in enumerate(out.logprobs or [])]
    rel = float(diff.max() / theirs.abs().max())
    return {"prompt_tokens": len(prompt), "new_tokens": n_new, "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()), "max_rel_logit_diff": rel,
            "max_abs_logit": float(theirs.abs().max()),
            "engine_logprob_max_abs_diff": max(engine_lp) if engine_lp else None,
            "greedy_mismatches": mismatches, "near_ties": ties,
            "greedy_equal_up_to_near_ties": len(mismatches) == len(ties),
            "logits_within_2e-2": rel <= 2e-2, "ours_tokens": ours_tokens}


def batch1(llm: LLM, hf, prompt: list[int], n_new: int, repeats: int, weight_bytes: int, bandwidth: float | None):
    dev = llm.device
    ids = torch.tensor([prompt], device=dev)
    pad = hf.generation_config.pad_token_id
    if pad is None:
        pad = hf.config.eos_token_id if isinstance(hf.config.eos_token_id, int) else 0

    def hf_generate(n: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=pad)
        sync(dev)
        assert seq.shape[1] - ids.shape[1] == n
        return time.perf_counter() - t0

    llm.generate([prompt], greedy(4))  # warm-up: kernels compiled, pool touched
    hf_generate(4)
    ours, theirs = [], []
    for _ in range(repeats):
        m = llm.generate([prompt], greedy(n_new))[0].metrics
        ours.append({"prefill_tok_s": len(prompt) / m.ttft_s, "decode_tok_s": m.decode_tok_s})
        t1, tn = hf_generate(1), hf_generate(n_new)
        theirs.append({"prefill_tok_s": len(prompt) / t1, "decode_tok_s": (n_new - 1) / max(tn - t1, 1e-9)})

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    ours_dec, theirs_dec = med(ours, "decode_tok_s"), med(theirs, "decode_tok_s")
    res = {"ours": {k: med(ours, k) for k in ours[0]}, "transformers": {k: med(theirs, k) for k in theirs[0]},
           "decode_speedup": ours_dec / theirs_dec, "prefill_speedup": med(ours, "prefill_tok_s") / med(theirs, "prefill_tok_s"),
           "weight_bytes_per_token": weight_bytes,
           "decode_bandwidth_fraction": (weight_bytes * ours_dec / (bandwidth * 1e9)) if bandwidth else None}
    return res, {"ours": ours}, {"transformers": theirs}


def hf_continuous(hf, prompts: list[list[int]], outputs: list[int], num_blocks: int | None) -> float:
    """Wall time of transformers' continuous batching (the manager `generate_batch` drives), each
    request with its own max_new_tokens and EOS off."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    cfg = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=-1)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p in prompts), max_generated_length=max(outputs),
                          num_requests=len(prompts))
    t0 = time.perf_counter()
    cb = ContinuousBatchingConfig(num_blocks=num_blocks) if num_blocks else None
    with hf.continuous_batching_context_manager(generation_config=cfg, block=True, timeout=5, workload_hints=hints,
                                                continuous_batching_config=cb) as manager:
        ids = [manager.add_request(p, max_new_tokens=o, eos_token_id=-1) for p, o in zip(prompts, outputs)]
        done: dict = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped before finishing the workload")
    wall = time.perf_counter() - t0
    short = [r.request_id for r in done.values() if r.error or len(r.generated_tokens) != outputs[ids.index(r.request_id)]]
    if short:
        raise RuntimeError(f"transformers' continuous batching left {len(short)} requests short or failed")
    return wall


def workload(llm: LLM, hf, args) -> tuple[dict, dict, dict]:
    corpus = corpus_ids(llm.tokenizer)
    wl = make_workload(corpus, args.num_requests, args.seed, max(1, args.max_prompt // 16), args.max_prompt,
                       max(1, args.max_output // 8), args.max_output)
    tokens = sum(wl.prompt_lens) + sum(wl.outputs)
    llm.generate([wl.prompts[0][:8]], greedy(2))  # warm-up
    sync(llm.device)
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, [greedy(o) for o in wl.outputs])
    sync(llm.device)
    ours = time.perf_counter() - t0
    assert [len(o.token_ids) for o in outs] == wl.outputs
    theirs = hf_continuous(hf, wl.prompts, wl.outputs, args.hf_num_blocks)
    res = {"workload": wl.summary(), "ours_wall_s": ours, "transformers_wall_s": theirs,
           "ours_tok_s": tokens / ours, "transformers_tok_s": tokens / theirs, "speedup": theirs / ours}
    return res, {"workload_wall_s": ours}, {"workload_wall_s": theirs}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM

    llm = LLM(args.model, dtype=args.torch_dtype, device=args.device, progress=False,
              kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.max_num_batched_tokens)
    dev = llm.device
    print(f"ours: {llm.name} on {dev}, {llm.dtype}, attention {llm.engine.storage.attention.name}", file=sys.stderr)
    hf = AutoModelForCausalLM.from_pretrained(str(llm.model_dir), dtype=llm.dtype).to(dev).eval()
    gpu = gpu_info(dev, args.bandwidth_gbs)
    corpus = corpus_ids(llm.tokenizer, args.prompt_tokens + 1)
    prompt = corpus[: args.prompt_tokens]
    results = {"gpu": gpu, "attention_backend": llm.engine.storage.attention.name, "dtype": str(llm.dtype)}
    results["equivalence"] = equivalence(llm, hf, prompt, min(args.new_tokens, 32), args.tie)
    print(f"1. equivalence: {results['equivalence']}", file=sys.stderr)
    results["batch1"], timings, baseline = batch1(llm, hf, prompt, args.new_tokens, args.repeats,
                                                  llm.model.bytes_read_per_token, gpu["bandwidth_gbs"])
    print(f"2. batch 1: {results['batch1']}", file=sys.stderr)
    if not args.skip_workload:
        results["workload"], t, b = workload(llm, hf, args)
        timings.update(t)
        baseline.update(b)
        print(f"3. workload: {results['workload']}", file=sys.stderr)
    results["wall_s"] = time.perf_counter() - started
    config = {k: v for k, v in vars(args).items() if k not in ("torch_dtype", "folder")}
    record.save("gpu_check", "benchmarks/gpu_check.py", argv, args.folder, threads=torch.get_num_threads(),
                timings=timings, baseline_timings=baseline, results=results, config=config)
    return results


if __name__ == "__main__":
    main()
