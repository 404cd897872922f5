"""Needle in a haystack: can the model still find one planted fact after the policy shaped the cache?

Cases (deterministic for a seed): for each context length L (tokens) a stretch of filler
from the evaluation corpus (`eval/corpus.py`, starting at a paragraph chosen by the seed),
and for each depth d a needle sentence ``The secret code for the vault is 7-4-2-9-1.`` with
its own random code, inserted at the start of the sentence (or paragraph, or else word)
nearest before filler token d*F (F filler tokens), looking back at most 4% of the filler.
The context (filler + needle) is about L tokens long.

Prompt layout (an external driver, e.g. kvpress in its own venv, must reproduce it; it is
also written into the cases file as "template"):

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + "\\n\\n" + question}],
        add_generation_prompt=True, tokenize=False)
    context part  = text up to and including the end of `context`
    question part = the rest ("\\n\\n" + question + the template's end and assistant header)
    ids = tokenize(context part) + tokenize(question part)   # add_special_tokens=False, each

The context part is prefilled through the policy cache in chunks (so eviction and
compression apply to it), then the question part in one chunk (as a chunked prefill of the
whole prompt would), then up to `max_new_tokens` greedy tokens, stopping at EOS. (kvpress's
pipeline gives the same text with question = "\\n\\n" + question: it splits the rendered
template at the end of the context and compresses only that part.)

Scoring: correct when the digits of the answer, in order, appear in the digits of the
output (every non-digit removed), so "7-4-2-9-1", "74291" and "7 4 2 9 1" all count.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvcache.errors import KVCacheError
from kvcache.eval.corpus import corpus_text
from kvcache.models.step import StepInputs

NEEDLE = "The secret code for the vault is {code}."
QUESTION = "What is the secret code for the vault? Answer with the code only."
SEPARATOR = "\n\n"
TEMPLATE = (
    "messages=[{'role': 'user', 'content': context + '\\n\\n' + question}], rendered with the model's chat "
    "template (add_generation_prompt=True, tokenize=False); the text up to the end of context is the context "
    "part (compressed), the rest is the question part; each part is tokenized alone with add_special_tokens=False "
    "and the ids concatenated. Greedy decoding, at most max_new_tokens new tokens, stop at EOS."
)
SCORING = ("correct iff the answer's digits, in order, are a contiguous substring of the output's digits "
           "(all non-digit characters removed from both)")


@dataclass(frozen=True)
class NeedleCase:
    id: str
    context: str
    question: str
    answer: str
    length: int  # target context length in tokens
    depth: float  # where the needle sits, as a fraction of the context


@dataclass
class NeedleAnswer:
    case_id: str
    output: str
    correct: bool
    seen: int  # context tokens prefilled
    held: int  # tokens the cache kept of them
    kv_bytes: int  # bytes it held for them


def is_correct(output: str, answer: str) -> bool:
    want = re.sub(r"\D", "", answer)
    return bool(want) and want in re.sub(r"\D", "", output)


def accuracy_by_length(cases: list[NeedleCase], correct: dict[str, bool]) -> dict[str, float]:
    """Fraction correct per context length, over the cases answered (keys: str(length))."""
    by: dict[str, list[bool]] = {}
    for c in cases:
        if c.id in correct:
            by.setdefault(str(c.length), []).append(correct[c.id])
    return {k: sum(v) / len(v) for k, v in by.items()}


def _paragraph_starts(text: str, limit: int) -> list[int]:
    return [0] + [m.end() for m in re.finditer(r"\n\n+", text) if m.end() < limit]


def _boundary_before(text: str, pos: int, reach: int) -> int:
    """Start of the sentence or paragraph nearest before `pos` (within `reach` characters), else of the word."""
    lo = max(0, pos - reach)
    best = max((m.end() for m in re.finditer(r"(?<=[.!?])\s+|\n\s*\n\s*", text[lo:pos])), default=None)
    if best is not None:
        return lo + best
    space = text.rfind(" ", lo, pos)
    return space + 1 if space >= 0 else pos


def make_cases(tokenizer, lengths: list[int], depths: list[float], seed: int = 0) -> list[NeedleCase]:
    """One case per (length, depth), deterministic for `seed`; same filler for every depth of a length."""
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise KVCacheError(f"Needle depths must be between 0 and 1, got {d}.")
    if not lengths or min(lengths) < 64:
        raise KVCacheError("Needle lengths must be at least 64 tokens.")
    rng = random.Random(seed)
    text = corpus_text()
    cases = []
    for length in lengths:
        span = 8 * length  # characters enough for `length` tokens (~4 per token)
        if span > len(text):
            raise KVCacheError(f"The filler text is too short for a {length}-token context.")
        start = rng.choice(_paragraph_starts(text, len(text) - span))
        window = text[start : start + span]
        enc = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)
        for depth in depths:
            code = "-".join(str(rng.randrange(10)) for _ in range(5))
            needle = NEEDLE.format(code=code)
            n_filler = length - len(tokenizer(needle, add_special_tokens=False)["input_ids"]) - 1
            offsets = enc["offset_mapping"]
            if len(offsets) <= n_filler:
                raise KVCacheError(f"The filler text is too short for a {length}-token context.")
            filler = window[: offsets[n_filler][0]]
            at = _boundary_before(filler, offsets[round(depth * n_filler)][0], reach=len(filler) // 25)
            context = filler[:at] + needle + " " + filler[at:]
            cases.append(NeedleCase(f"len{length}-depth{depth:g}", context, QUESTION, code, length, depth))
    return cases


def prompt_parts(tokenizer, case: NeedleCase) -> tuple[list[int], list[int]]:
    """(context ids, question ids) in the documented layout."""
    messages = [{"role": "user", "content": case.context + SEPARATOR + case.question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    end = text.index(case.context) + len(case.context)
    encode = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return encode(text[:end]), encode(text[end:])


def answer_case(llm, case: NeedleCase, kv_policy: str | None = None, max_new_tokens: int = 24,
                chunk: int = 512) -> NeedleAnswer:
    """Prefill the context, then the question, then greedy decoding; score the output.

    As kvpress does, an eviction policy compresses the context once, after seeing all of it
    (one prefill chunk), and never the question: the question is fed a token at a time, and
    prompt-chunk eviction only runs after chunks of more than one token. Other policies take
    the context in chunks of `chunk` tokens (a window then really slides over it).
    """
    context_ids, question_ids = prompt_parts(llm.tokenizer, case)
    cache = llm.new_policy_cache(kv_policy)
    model, dev = llm.model, llm.device
    if any(s.name == "evict" for s in cache.spec.selectors):
        chunk = len(context_ids)
    with torch.inference_mode():
        for start in range(0, len(context_ids), chunk):
            piece = torch.tensor([context_ids[start : start + chunk]], device=dev)  # (1, t)
            model.forward(StepInputs(piece, None, cache.next_position, None, "last"), cache)
        seen, held, kv_bytes = cache.seen, cache.length, cache.nbytes_used
        for token in question_ids[:-1]:
            model.forward(StepInputs(torch.tensor([[token]], device=dev), None, cache.next_position, None), cache)
        step = torch.tensor([question_ids[-1:]], device=dev)  # (1, 1)
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = model.forward(StepInputs(step, None, cache.next_position, None, "last"), cache)  # (1, V)
            token = int(logits[0].argmax())
            if token in llm.eos_ids:
                break
            out.append(token)
            step = torch.tensor([[token]], device=dev)
    text = llm.tokenizer.decode(out, skip_special_tokens=True)
    return NeedleAnswer(case.id, text, is_correct(text, case.answer), seen, held, kv_bytes)


def write_cases(path: str | Path, cases: list[NeedleCase], model_dir: str, max_new_tokens: int = 24) -> Path:
    """The cases file an external driver answers: model_dir, the layout, the scoring and the cases."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model_dir": str(model_dir), "template": TEMPLATE,
           "separator": SEPARATOR, "max_new_tokens": max_new_tokens, "scoring": SCORING,
           "cases": [asdict(c) for c in cases]}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    return path


def read_cases(path: str | Path) -> tuple[str, list[NeedleCase]]:
    doc = json.loads(Path(path).read_text())
    return doc["model_dir"], [NeedleCase(**c) for c in doc["cases"]]
