"""benchmarks/bench_structured_output.py: its arguments, the schema's worst-case reply length (the
grammar takes no more), the prompts and request bodies, and how runs are summed up."""

from __future__ import annotations

import json

import jsonschema
import pytest
import xgrammar

from tests.helpers import load_benchmark


def _matcher(schema: dict):
    """A matcher of `schema`'s grammar as the server compiles it (no free whitespace)."""
    info = xgrammar.TokenizerInfo(["a"])
    compiled = xgrammar.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(schema),
                                                                                 any_whitespace=False)
    return xgrammar.GrammarMatcher(compiled)


@pytest.mark.parametrize("argv, message", [
    (["--requests", "0"], "--requests must be at least 1"),
    (["--clients", "0"], "--clients must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--requests", "251"], "--requests must be at most 250"),
    (["--max-tokens", "256"], "--max-tokens 256 is below the schema's worst case of 642 tokens"),
    (["--temperature", "3"], "--temperature must be between 0 and 2"),
    (["--start-timeout", "0"], "--start-timeout must be positive"),
])
def test_bad_arguments_are_one_sentence_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        load_benchmark("bench_structured_output").parse_args([*argv, "--no-record"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_defaults_are_the_issues_workload():
    bench = load_benchmark("bench_structured_output")
    args = bench.parse_args(["--no-record"])
    assert (args.requests, args.clients, args.repeats, args.record_folder) == (50, 8, 3, None)
    assert args.max_tokens == bench.max_reply_bytes(bench.SCHEMA) == 642


def test_the_largest_reply_is_valid_and_the_grammar_takes_nothing_longer():
    bench = load_benchmark("bench_structured_output")
    largest = bench.largest_instance(bench.SCHEMA)
    jsonschema.validate(largest, bench.SCHEMA)
    text = bench.reply_text(largest)
    assert len(text.encode()) == bench.max_reply_bytes(bench.SCHEMA)
    whole = _matcher(bench.SCHEMA)
    assert whole.accept_string(text) and whole.is_completed()
    longer = text.replace('"city": "', '"city": "x', 1)  # one character past a maxLength
    assert not _matcher(bench.SCHEMA).accept_string(longer)
    more = text.replace('"skills": [', '"skills": [{"skill": "a", "level": 1}, ', 1)  # one item past maxItems
    assert not _matcher(bench.SCHEMA).accept_string(more)


@pytest.mark.parametrize("schema, most", [
    ({"type": "string", "maxLength": 3}, 2 + 3 * 4),  # quotes + three 4-byte characters
    ({"type": "integer", "minimum": -100, "maximum": 5}, 4),
    ({"enum": ["ab", "abcd"]}, 6),
    ({"type": "array", "maxItems": 2, "items": {"type": "boolean"}}, len("[false, false]")),
    ({"type": "object", "additionalProperties": False,
      "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}, len('{"a": 0}')),
])
def test_worst_case_bytes_of_each_kind(schema, most):
    bench = load_benchmark("bench_structured_output")
    assert bench.max_reply_bytes(schema) == most
    whole = _matcher(schema)  # and the grammar does take a reply that long
    assert whole.accept_string(bench.reply_text(bench.largest_instance(schema))) and whole.is_completed()


def test_a_string_of_four_byte_characters_reaches_the_bound():
    schema = {"type": "string", "maxLength": 3}
    assert _matcher(schema).accept_string('"\U0001f680\U0001f680\U0001f680"')  # 14 bytes
    assert not _matcher(schema).accept_string('"\U0001f680\U0001f680\U0001f680\U0001f680"')


@pytest.mark.parametrize("schema, why", [
    ({"type": "string"}, "string without maxLength"),
    ({"type": "array", "items": {"type": "boolean"}}, "array without maxItems"),
    ({"type": "integer", "minimum": 0}, "integer without minimum and maximum"),
    ({"type": "object", "properties": {}}, "without additionalProperties: false"),
    ({"type": "number"}, "type 'number' is not bounded"),
])
def test_a_schema_part_without_a_bound_is_refused(schema, why):
    with pytest.raises(ValueError, match=why):
        load_benchmark("bench_structured_output").max_reply_bytes(schema)


def test_prompts_differ_and_ask_for_every_field():
    bench = load_benchmark("bench_structured_output")
    prompts = [bench.prompt(i) for i in range(len(bench.PEOPLE) * len(bench.WORDINGS))]
    assert len(set(prompts)) == len(prompts)
    assert len({p.split(" Answer with")[0].split(" ")[0] for p in prompts[:50]}) > 5  # worded differently
    for field in bench.SCHEMA["required"] + bench.SCHEMA["properties"]["address"]["required"]:
        assert field in prompts[0]


def test_request_bodies_masked_and_unmasked():
    bench = load_benchmark("bench_structured_output")
    args = bench.parse_args(["--no-record", "--seed", "10", "--temperature", "0.5"])
    masked, plain = bench.request_body(3, args, True, 642), bench.request_body(3, args, False, 97)
    assert masked["messages"] == plain["messages"] == [{"role": "user", "content": bench.prompt(3)}]
    assert (masked["seed"], masked["temperature"], masked["max_tokens"]) == (13, 0.5, 642)
    assert masked["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "person_profile", "strict": True, "schema": bench.SCHEMA}} and "ignore_eos" not in masked
    assert plain["max_tokens"] == 97 and plain["ignore_eos"] is True and "response_format" not in plain


def test_a_run_is_summed_up_with_its_invalid_replies():
    bench = load_benchmark("bench_structured_output")
    good = bench.reply_text(bench.largest_instance(bench.SCHEMA))
    replies = [
        {"content": good, "finish_reason": "stop", "tokens": 100, "latency_s": 1.0},
        {"content": good[:-1], "finish_reason": "length", "tokens": 60, "latency_s": 1.5},
        {"content": good.replace('"age": 120', '"age": 121'), "finish_reason": "stop", "tokens": 40, "latency_s": 2.0},
    ]
    run = bench.summarize(replies, 4.0, bench.SCHEMA)
    assert (run["valid"], run["generated_tokens"], run["tok_s"]) == (1, 200, 50.0)
    assert run["finish_reasons"] == {"stop": 2, "length": 1}
    assert [(x["index"], x["finish_reason"]) for x in run["invalid"]] == [(1, "length"), (2, "stop")]
    assert run["invalid"][0]["why"].startswith("not JSON") and "121" in run["invalid"][1]["why"]
    assert "content" not in run["per_request"][0] and run["per_request"][2]["tokens"] == 40
    assert "valid" not in bench.summarize(replies, 4.0, None)


def test_masked_and_unmasked_are_compared_repeat_by_repeat():
    bench = load_benchmark("bench_structured_output")
    masked = [{"tok_s": 90.0}, {"tok_s": 60.0}, {"tok_s": 80.0}]
    unmasked = [{"tok_s": 100.0}, {"tok_s": 100.0}, {"tok_s": 80.0}]
    out = bench.compare(masked, unmasked)
    assert out["ratios"] == [0.9, 0.6, 1.0] and out["ratio_median"] == 0.9 and out["meets_goal"]
    assert (out["masked_tok_s"], out["unmasked_tok_s"]) == (80.0, 100.0)
    assert not bench.compare(masked[1:2], unmasked[1:2])["meets_goal"]
