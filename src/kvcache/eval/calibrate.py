"""Which layers to keep at higher precision: per-layer sensitivity of a quantized KV policy.

For each layer and each of keys and values, the perplexity of a calibration text when only
that layer's keys (values) are raised to `hi_bits` (`hi_keys=<layer>` / `hi_values=<layer>`)
and everything else stays as the base policy has it; the gain over the base perplexity is
how much that layer's quantization costs. The calibration text is a stretch of the
evaluation corpus far past the tokens `kvcache eval` reads (it reads from the start), so
the layers are not picked on the text they are judged on.

    python -m kvcache.eval.calibrate --policy "quantized:bits=2,group_size=64,residual=64,n_sink=4,exact=fp16"
"""

from __future__ import annotations

import argparse
import json
import math

from kvcache.eval.corpus import corpus_token_ids
from kvcache.eval.perplexity import token_losses
from kvcache.models.loader import DEFAULT_MODEL

#: Where the calibration text starts in the corpus (tokens), and its default length.
CALIBRATION_OFFSET = 32768
CALIBRATION_TOKENS = 2048


def calibration_ids(tokenizer, n: int = CALIBRATION_TOKENS, offset: int = CALIBRATION_OFFSET) -> list[int]:
    """Tokens [offset, offset + n) of the evaluation corpus (the eval reads its first tokens)."""
    return corpus_token_ids(tokenizer, offset + n)[offset:]


def with_key(policy: str, key: str, value: str) -> str:
    """`policy` with `key=value` added to its (last) part."""
    return f"{policy}{',' if ':' in policy.split('+')[-1] else ':'}{key}={value}"


def layer_sensitivity(llm, ids: list[int], policy: str, hi_bits: int = 4,
                      parts: tuple[str, ...] = ("hi_keys", "hi_values"), chunk: int = 32) -> dict:
    """{"base": ppl, "hi_keys": [ppl per layer], "hi_values": [...]}: perplexity of `ids` under
    `policy` with only that one layer's keys (values) at `hi_bits`."""
    out = {"base": token_losses(llm, ids, policy, chunk).perplexity()}
    for part in parts:
        out[part] = [token_losses(llm, ids, with_key(with_key(policy, part, str(i)), "hi_bits", str(hi_bits)),
                                  chunk).perplexity() for i in range(llm.model.config.num_layers)]
    return out


def most_sensitive(result: dict, part: str, n: int) -> list[int]:
    """The n layers whose `part` at high precision lowers the perplexity most."""
    gains = [math.log(result["base"] / p) for p in result[part]]
    return sorted(sorted(range(len(gains)), key=lambda i: -gains[i])[:n])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--hi-bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=CALIBRATION_TOKENS)
    ap.add_argument("--offset", type=int, default=CALIBRATION_OFFSET)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    import torch

    from kvcache import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype="float32")
    result = layer_sensitivity(llm, calibration_ids(llm.tokenizer, args.tokens, args.offset), args.policy,
                               args.hi_bits)
    result.update(policy=args.policy, hi_bits=args.hi_bits, tokens=args.tokens, offset=args.offset)
    for part in ("hi_keys", "hi_values"):
        gains = " ".join(f"{i}:{100 * (result['base'] / p - 1):+.2f}%" for i, p in enumerate(result[part]))
        print(f"{part} gain by layer: {gains}")
        print(f"{part} top 4: {'/'.join(map(str, most_sensitive(result, part, 4)))}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
