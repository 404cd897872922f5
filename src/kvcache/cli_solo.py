"""`kvcache generate --solo` and `kvcache chat --solo`: the single-user runtime (`kvcache.solo`),
in a process that never imports torch. Flags it cannot honour are refused in one sentence."""

from __future__ import annotations

import json
import os
import sys

from kvcache.engine.length_rule import check_length
from kvcache.errors import KVCacheError

#: (flag, whether the command line set it to something the runtime does not run)
_UNSUPPORTED = (
    ("--device", lambda a: a.device != "cpu"),
    ("--dtype", lambda a: a.dtype not in (None, "float32", "fp32")),
    ("--kv-policy", lambda a: a.kv_policy is not None),
    ("--kv-tier", lambda a: getattr(a, "kv_tier", None) is not None),
    ("--quantization", lambda a: a.quantization not in ("auto", "gguf")),
    ("--kernels", lambda a: a.kernels not in ("auto", "native")),
    ("--truncation left", lambda a: a.truncation != "error"),
    ("--repetition-penalty", lambda a: a.repetition_penalty != 1.0),
    ("--no-cache", lambda a: getattr(a, "no_cache", False)),
    ("--overflow summarize", lambda a: getattr(a, "overflow", "truncate") == "summarize"),
    ("--sessions-dir", lambda a: getattr(a, "sessions_dir", None) is not None),
)


def _generator(args):
    """The runtime for the command line's model (K/V sized for --max-model-len, default the
    model's context), after checking its flags."""
    for flag, given in _UNSUPPORTED:
        if given(args):
            raise KVCacheError(f"--solo runs a GGUF's packed weights in float32 on the CPU with the K/V kept "
                               f"exactly, one conversation; {flag} needs the engine (drop --solo).")
    if args.threads is not None:  # read by the OpenMP runtime when the kernels' library loads
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from kvcache.solo import load_solo

    return load_solo(args.model, args.max_model_len)


def generate(args, params) -> int:
    """`kvcache generate --solo`: `params` are the command line's SamplingParams."""
    gen = _generator(args)
    ids = gen.tokenizer.encode(args.prompt)
    out = None
    for piece in gen.stream(ids, params):
        if isinstance(piece, str):
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        else:
            out = piece
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "metrics": {"prompt_tokens": out.prompt_tokens, "ttft_s": out.ttft_s,
                                      "decode_tok_s": out.decode_tok_s, "runtime": "solo"}}))
    else:
        sys.stdout.write("\n")
    return 0


def chat(args, params) -> int:
    """`kvcache chat --solo`: one message, or the interactive loop, over a SoloChat."""
    from kvcache.cli_chat import one_shot, repl
    from kvcache.solo import SoloChat

    gen = _generator(args)
    check_length(params.max_tokens, gen.model.max_len)  # before the first message, not at it
    session = SoloChat(gen, system=args.system, overflow=args.overflow, max_history_tokens=args.max_history_tokens)
    if args.message is not None:
        return one_shot(session, args.message, params)
    return repl(session, params, saves=False)
