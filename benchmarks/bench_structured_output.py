"""Structured output through `kvcache serve`: replies held to a nested JSON schema, and what the
token masks cost in throughput.

One server (the real command line, `python -m kvcache.cli serve ...`, on a free 127.0.0.1 port,
started and stopped by this script) answers `--requests` chat requests, each asking in its own
words for a person's profile, with `response_format={"type": "json_schema", "json_schema":
{"name": "person_profile", "strict": true, "schema": SCHEMA}}` (`--temperature`, seed
`--seed` + i). SCHEMA nests an object and an array of objects; every string has a maxLength,
the array a maxItems, the integers a range, every object all its properties required and no
others. So every reply the grammar allows is at most `max_reply_bytes(SCHEMA)` bytes of UTF-8
(a string character is at most 4 bytes), hence at most as many tokens (each token the grammar
can take is at least one byte): `--max-tokens` below that is refused, and a reply cut at
max_tokens would be a bug. Each reply's content must `json.loads` and validate under SCHEMA
(`jsonschema`); its finish_reason is counted.

That first pass also warms the server. Then the throughput: the same requests sent by
`--clients` concurrent clients, with the schema (masked) and without (unmasked: no
response_format, `ignore_eos`, each request's max_tokens the token count its masked reply had
in the first pass, so both sides generate the same lengths from the same prompts), `--repeats`
times, alternating which side goes first. Reported: generated tokens/s of each run (completion
tokens / the run's wall time), their medians, and the median over repeats of masked/unmasked
(the goal is at least 0.8). Every masked reply of the timed runs is validated too. The prompts
repeat across runs, so after the first pass their prefixes come from the prefix cache on both
sides alike.

    python benchmarks/bench_structured_output.py --json                     # the measured run
    python benchmarks/bench_structured_output.py --requests 6 --repeats 1 --no-record   # a quick check

Progress goes to stderr; `--json` prints the results on stdout (the table goes to stderr). Each
run writes its record to `--record-dir` (default benchmarks/results; the masked runs are its
timings, the unmasked runs the baseline); `--no-record` writes none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter

from kvcache.bench import record
from kvcache.bench.common import consoles, require_at_least_one, run_main
from kvcache.bench.serve import ServeProcess, run_clients
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL

MODEL_ID = "bench"  # the served model name
SCHEMA_NAME = "person_profile"
GOAL_RATIO = 0.8  # masked / unmasked generated tokens/s
ROLES = ["engineer", "teacher", "doctor", "artist", "student", "other"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ROLES},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 20},
                "country": {"type": "string", "minLength": 1, "maxLength": 20},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "skills": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "skill": {"type": "string", "minLength": 1, "maxLength": 16},
                    "level": {"type": "integer", "minimum": 1, "maximum": 5},
                },
                "required": ["skill", "level"],
                "additionalProperties": False,
            },
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "skills", "active"],
    "additionalProperties": False,
}
# who the profile is of, and how the request is worded: prompt i takes PEOPLE[i % len(PEOPLE)]
# and a wording one further on each round through PEOPLE, so all len(PEOPLE) x len(WORDINGS) differ
PEOPLE = [
    "a nurse who works night shifts in Lima", "a retired pilot living in Nairobi", "a chef from Osaka",
    "a first-year physics student in Oslo", "a street painter in Valparaiso", "a rice farmer near Chennai",
    "a software developer in Toronto", "a jazz singer from Accra", "a primary school teacher in Lyon",
    "a surgeon at a hospital in Berlin", "a marine biologist in Hobart", "a carpenter from Krakow",
    "a librarian in Dublin", "a taxi driver in Mexico City", "a violin maker in Cremona",
    "a data analyst in Singapore", "a beekeeper in rural Slovenia", "a fashion designer in Milan",
    "a high-school chemistry teacher in Austin", "a mountain guide in Kathmandu", "a potter in Kyoto",
    "a civil engineer building bridges in Lisbon", "an architecture student in Barcelona",
    "a dentist in Buenos Aires", "a retired firefighter in Glasgow",
]
WORDINGS = [
    "Create a profile of {who}.",
    "Invent {who} and describe them.",
    "I need sample data: a person record for {who}.",
    "Write a short profile for a fictional character: {who}.",
    "Describe {who}, including where they live and what they are good at.",
    "Make up a realistic person: {who}.",
    "Give me a test user for my app, based on {who}.",
    "Fill in a profile card for {who}.",
    "Imagine {who}. Who are they?",
    "Generate an example record of {who} for a database.",
]
FIELDS = ("Answer with a JSON object with the fields name, age, role (one of " + ", ".join(ROLES) +
          "), address (city and country), skills (one to three, each a skill and a level from 1 to 5) "
          "and active (true or false).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Structured output through kvcache serve: nested json_schema replies "
                                            "validated, throughput with token masks vs without.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--requests", type=int, default=50, help="chat requests, each its own prompt (default 50)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating (default 3)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens of a masked request (default: the schema's worst case, "
                        f"{max_reply_bytes(SCHEMA)}; less is refused)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="request i's seed is this + i (default 0)")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads (default 2)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds the server may take to come up "
                                                                      "(default 300)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the table goes to stderr)")
    record.add_arguments(p)
    args = p.parse_args(argv)
    require_at_least_one(p, args, ("requests", "clients", "repeats", "threads"))
    limit = len(PEOPLE) * len(WORDINGS)
    if args.requests > limit:
        p.error(f"--requests must be at most {limit} (the distinct prompts)")
    bound = max_reply_bytes(SCHEMA)
    if args.max_tokens is None:
        args.max_tokens = bound
    elif args.max_tokens < bound:
        p.error(f"--max-tokens {args.max_tokens} is below the schema's worst case of {bound} tokens: "
                "a valid reply could be cut")
    if not 0 <= args.temperature <= 2:
        p.error("--temperature must be between 0 and 2")
    if args.start_timeout <= 0:
        p.error("--start-timeout must be positive")
    args.record_folder = record.parse_folder(p, args)
    return args


# -- the schema's bounds and the prompts (pure) -----------------------------------------------

def largest_instance(schema: dict):
    """The longest JSON value `schema` allows, as written by the grammar (`", "` and `": "`
    separators): every string at its maxLength in 4-byte characters, every array at its maxItems,
    the longest enum value, the widest integer, `false`. A schema part without such a bound
    (a string without maxLength or enum, an array without maxItems, an integer without both
    minimum and maximum, a number, an object with properties beyond its own) is a ValueError:
    its replies have no length limit."""
    if "enum" in schema:
        return max(schema["enum"], key=lambda v: len(json.dumps(v, ensure_ascii=False).encode()))
    kind = schema.get("type")
    if kind == "string":
        if "maxLength" not in schema:
            raise ValueError("a string without maxLength has no length limit")
        return "\U0001d11e" * schema["maxLength"]  # 4 bytes of UTF-8 each
    if kind == "integer":
        if "minimum" not in schema or "maximum" not in schema:
            raise ValueError("an integer without minimum and maximum has no length limit")
        return max(schema["minimum"], schema["maximum"], key=lambda v: len(str(v)))
    if kind == "boolean":
        return False
    if kind == "array":
        if "maxItems" not in schema:
            raise ValueError("an array without maxItems has no length limit")
        return [largest_instance(schema["items"])] * schema["maxItems"]
    if kind == "object":
        if schema.get("additionalProperties", True) is not False:
            raise ValueError("an object without additionalProperties: false has no length limit")
        return {k: largest_instance(v) for k, v in schema.get("properties", {}).items()}
    raise ValueError(f"type {kind!r} is not bounded here")


def reply_text(value) -> str:
    """`value` as the grammar writes JSON: no newlines, `", "` and `": "` separators."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def max_reply_bytes(schema: dict) -> int:
    """The most UTF-8 bytes a reply under `schema` can take, and so the most tokens."""
    return len(reply_text(largest_instance(schema)).encode())


def prompt(i: int) -> str:
    """The i-th user message: who to profile, worded its own way, and the fields wanted."""
    who = PEOPLE[i % len(PEOPLE)]
    wording = WORDINGS[(i % len(PEOPLE) + i // len(PEOPLE)) % len(WORDINGS)]
    return f"{wording.format(who=who)} {FIELDS}"


def request_body(i: int, args, masked: bool, max_tokens: int) -> dict:
    """Request i's chat body: with the schema as response_format, or without it and EOS ignored."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "temperature": args.temperature, "seed": args.seed + i}
    if masked:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    return body


def check_reply(content: str | None, schema: dict) -> str | None:
    """None when `content` is JSON valid under `schema`, else why not (one line)."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(content or ""), schema)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    except jsonschema.ValidationError as exc:
        return f"invalid: {exc.message}"
    return None


def summarize(replies: list[dict], wall_s: float, schema: dict | None) -> dict:
    """One run's figures from its replies ({"tokens", "finish_reason", "latency_s", "content"}):
    generated tokens/s over the run's wall time, finish reasons and, with a schema, how many
    replies validate and why the others did not."""
    tokens = sum(r["tokens"] for r in replies)
    out = {"requests": len(replies), "generated_tokens": tokens, "wall_s": wall_s,
           "tok_s": tokens / wall_s if wall_s > 0 else 0.0,
           "finish_reasons": dict(Counter(r["finish_reason"] for r in replies)),
           "per_request": [{k: v for k, v in r.items() if k != "content"} for r in replies]}
    if schema is not None:
        problems = [(i, check_reply(r["content"], schema)) for i, r in enumerate(replies)]
        out["valid"] = sum(p is None for _, p in problems)
        out["invalid"] = [{"index": i, "why": p, "finish_reason": replies[i]["finish_reason"],
                           "content": (replies[i]["content"] or "")[:300]} for i, p in problems if p is not None]
    return out


def compare(masked: list[dict], unmasked: list[dict]) -> dict:
    """Masked vs unmasked runs (paired by repeat): each side's median tokens/s, the ratio of each
    repeat and their median, and whether that meets the goal."""
    ratios = [m["tok_s"] / u["tok_s"] for m, u in zip(masked, unmasked)]
    ratio = statistics.median(ratios)
    return {"masked_tok_s": statistics.median(r["tok_s"] for r in masked),
            "unmasked_tok_s": statistics.median(r["tok_s"] for r in unmasked),
            "ratios": ratios, "ratio_median": ratio, "goal": GOAL_RATIO, "meets_goal": ratio >= GOAL_RATIO}


# -- requests ----------------------------------------------------------------------------------

def chat(client, url: str, body: dict) -> dict:
    """One /v1/chat/completions request: its content, finish_reason, completion tokens, latency."""
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body, timeout=600)
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        raise KVCacheError(f"A request failed with HTTP {r.status_code}: {r.text[:200]}")
    d = r.json()
    choice = d["choices"][0]
    return {"content": choice["message"].get("content"), "finish_reason": choice["finish_reason"],
            "tokens": d["usage"]["completion_tokens"], "latency_s": latency}


def send_all(url: str, bodies: list[dict], clients: int) -> tuple[list[dict], float]:
    """The bodies through `clients` concurrent clients: (replies in order, wall seconds)."""
    return run_clients(bodies, clients, lambda client, body: chat(client, url, body))


# -- report ------------------------------------------------------------------------------------

def table(results: dict, args):
    from rich import box
    from rich.table import Table

    v, t = results["validity"], results["throughput"]
    title = (f"Structured output through kvcache serve: {args.model}, {args.threads} server thread(s), "
             f"{args.clients} clients; {results['machine']['cpu']} ({results['machine']['cores']} cores)")
    tab = Table(title=title, box=box.SIMPLE_HEAVY)
    tab.add_column("figure", justify="left")
    tab.add_column("value", justify="right")
    tab.add_row("valid replies, first pass (json.loads + jsonschema)", f"{v['valid']}/{v['requests']}")
    tab.add_row("finish reasons, first pass", ", ".join(f"{k} {n}" for k, n in sorted(v["finish_reasons"].items())))
    tab.add_row("valid replies, timed masked runs", f"{results['valid_timed']}/{results['requests_timed']}")
    lengths = results["reply_tokens"]
    tab.add_row("reply tokens min / median / max (bound, max_tokens)",
                f"{lengths['min']} / {lengths['median']:g} / {lengths['max']} "
                f"({results['max_reply_tokens']}, {args.max_tokens})")
    for side in ("masked", "unmasked"):
        runs = ", ".join(f"{r['tok_s']:.1f}" for r in results["runs"][side])
        tab.add_row(f"generated tok/s, {side} (each run)", f"{t[side + '_tok_s']:.1f} ({runs})")
    tab.add_row(f"masked / unmasked, median of repeats (goal >= {GOAL_RATIO})",
                f"{t['ratio_median']:.3f} ({', '.join(f'{x:.3f}' for x in t['ratios'])})")
    return tab


def main(argv: list[str] | None = None) -> dict:
    from kvcache.bench.common import machine_info

    args = parse_args(argv)
    console, err = consoles(args.json, width=140)
    n = args.requests
    serve_args = ["--model", args.model, "--served-model-name", MODEL_ID, "--threads", str(args.threads),
                  "--log-level", "warning"]
    runs: dict[str, list[dict]] = {"masked": [], "unmasked": []}
    with ServeProcess(serve_args, err, "server", args.start_timeout) as srv:
        masked_bodies = [request_body(i, args, True, args.max_tokens) for i in range(n)]
        err.print(f"first pass: {n} json_schema requests, {args.clients} clients")
        replies, wall = send_all(srv.url, masked_bodies, args.clients)
        first = summarize(replies, wall, SCHEMA)
        first["replies"] = [r["content"] for r in replies]
        err.print(f"first pass: {first['valid']}/{n} valid, finish reasons {first['finish_reasons']}, {wall:.1f} s")
        lengths = [r["tokens"] for r in replies]
        unmasked_bodies = [request_body(i, args, False, max(1, k)) for i, k in enumerate(lengths)]
        send_all(srv.url, unmasked_bodies[:args.clients], args.clients)  # the unmasked path's first calls, untimed
        for rep in range(args.repeats):
            for side in ("masked", "unmasked")[:: 1 if rep % 2 == 0 else -1]:
                bodies = masked_bodies if side == "masked" else unmasked_bodies
                replies, wall = send_all(srv.url, bodies, args.clients)
                run = summarize(replies, wall, SCHEMA if side == "masked" else None)
                runs[side].append(run)
                extra = f", {run['valid']}/{n} valid" if side == "masked" else ""
                err.print(f"repeat {rep + 1}/{args.repeats} {side}: {run['generated_tokens']} tokens in "
                          f"{wall:.1f} s = {run['tok_s']:.1f} tok/s{extra}")
    machine = machine_info()
    results = {
        "machine": machine, "schema_name": SCHEMA_NAME, "schema": SCHEMA,
        "max_reply_tokens": max_reply_bytes(SCHEMA), "max_tokens": args.max_tokens,
        "validity": {k: v for k, v in first.items() if k != "per_request"},
        "valid_timed": sum(r["valid"] for r in runs["masked"]), "requests_timed": n * args.repeats,
        "reply_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "unmasked_lengths_as_asked": all(r["per_request"][i]["tokens"] == max(1, k) for r in runs["unmasked"]
                                         for i, k in enumerate(lengths)),
        "throughput": compare(runs["masked"], runs["unmasked"]),
        "runs": {side: [{k: v for k, v in r.items() if k != "per_request"} for r in rs] for side, rs in runs.items()},
    }
    console.print(table(results, args))
    if args.json:
        sys.stdout.write(json.dumps(record.json_safe(results), indent=2) + "\n")
        sys.stdout.flush()
    record.save("bench_structured_output", "python benchmarks/bench_structured_output.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args), machine=machine, results=results,
                timings={"first_pass": first["per_request"], "masked": runs["masked"]},
                baseline_timings={"unmasked": runs["unmasked"]})
    return results


if __name__ == "__main__":
    run_main(main)
