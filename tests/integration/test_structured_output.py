"""Structured output from the engine: JSON schemas as token masks on the tiny random model."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from kvcache import SamplingParams
from kvcache.engine.grammar import Grammars
from kvcache.errors import KVCacheError
from kvcache.models.step import StepInputs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
}
PROMPTS = ["Hello, how are you?", "The quick brown fox", "Numbers are fun too: one, two"]


def structured(n: int = 80, **kw) -> SamplingParams:
    kw.setdefault("json_schema", SCHEMA)
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_greedy_output_is_json_valid_under_the_schema(tiny_llm):
    for out in tiny_llm.generate(PROMPTS, structured()):
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.token_ids[-1] not in tiny_llm.eos_ids  # it ends when the JSON is complete


def test_without_the_mask_the_tiny_model_writes_no_json(tiny_llm):
    """What the mask changes: the same prompts unconstrained are not JSON."""
    for out in tiny_llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0.0)):
        with pytest.raises(ValueError):
            json.loads(out.text)


def _last_logits(llm, ids: list[int]) -> torch.Tensor:
    """(V,) the model's logits after `ids`, recomputed without any cache."""
    from kvcache.cache.dense import KVCache

    cache = KVCache.for_model(llm.model, 1, len(ids))
    with torch.inference_mode():
        return llm.model.forward(StepInputs(torch.tensor([ids]), None, 0, None), cache)[0].float()


def test_every_token_is_the_best_one_the_grammar_allows(tiny_llm):
    """Step by step against a fresh matcher: each sampled token is allowed, and it is the
    argmax of the model's logits over the allowed tokens (so no forbidden token got through)."""
    prompt = tiny_llm.encode(PROMPTS[0])
    out = tiny_llm.generate([prompt], structured())[0]
    state = tiny_llm.engine.grammars.state(structured(), tiny_llm.eos_ids)
    forbidden_best = 0
    for i, token in enumerate(out.token_ids):
        allowed = state.allowed()  # (V,)
        assert allowed[token], f"token {token} at step {i} is outside the grammar"
        logits = _last_logits(tiny_llm, prompt + out.token_ids[:i])
        assert token == int(logits.masked_fill(~allowed, float("-inf")).argmax())
        forbidden_best += not allowed[int(logits.argmax())]
        state.accept(token)
    assert state.finished
    assert forbidden_best > 0  # the mask mattered at some step


def test_rows_with_and_without_grammars_batched_equal_each_alone(tiny_llm):
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    params = [structured(), plain, structured(json_schema=None, json_object=True), plain]
    prompts = PROMPTS + [PROMPTS[0]]
    together = tiny_llm.generate(prompts, params)
    alone = [tiny_llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert isinstance(json.loads(together[2].text), dict)


def test_sampled_output_follows_the_schema_too(tiny_llm):
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=7, json_schema=SCHEMA)
    for out in tiny_llm.generate(PROMPTS, params):
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_logprobs_stay_the_models_own(tiny_llm):
    out = tiny_llm.generate([PROMPTS[1]], structured(logprobs=1))[0]
    assert [e.token_id for e in out.logprobs] == out.token_ids
    assert any(e.top[0][0] != e.token_id for e in out.logprobs)  # the unmasked best was elsewhere


def test_json_schema_from_text_and_chat(tiny_llm):
    params = SamplingParams(max_tokens=80, temperature=0.0, json_schema=json.dumps(SCHEMA))
    assert params.json_schema == SCHEMA
    out = tiny_llm.chat([{"role": "user", "content": "Tell me about a person."}], params)
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_length_bounded_strings_hold_no_raw_control_characters(tiny_llm):
    """xgrammar's class for minLength/maxLength strings lets control characters in; ours does not."""
    grammars: Grammars = tiny_llm.engine.grammars
    state = grammars.state(SamplingParams(json_schema={"type": "string", "maxLength": 4}), tiny_llm.eos_ids)
    state.accept(tiny_llm.tokenizer.convert_tokens_to_ids('"'))
    controls = [i for i in range(256) if tiny_llm.tokenizer.decode([i]) in {chr(c) for c in range(32)}]
    assert controls and not state.allowed()[controls].any()


@pytest.mark.parametrize("kwargs, match", [
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema must be a JSON object"),
    ({"json_schema": {"type": "object"}, "json_object": True}, "not both"),
    ({"json_object": "yes"}, "json_object must be"),
])
def test_bad_grammar_params_are_one_sentence(kwargs, match):
    with pytest.raises(KVCacheError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("schema", [{"type": "bogus"}, {"type": "object", "properties": 3}])
def test_a_schema_that_does_not_compile_fails_before_any_work(tiny_llm, schema):
    with pytest.raises(KVCacheError, match="The JSON schema cannot be used: ") as info:
        tiny_llm.generate(["Hi"], SamplingParams(max_tokens=4, json_schema=schema))
    assert "\n" not in str(info.value) and ".cc" not in str(info.value)
    assert tiny_llm.engine.stats()["running"] == 0


def test_each_of_n_samples_has_its_own_matcher(tiny_llm):
    """n samples fork from one prompt: each follows the schema from its own grammar state."""
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=3, n=4, json_schema=SCHEMA)
    out = tiny_llm.generate([PROMPTS[0]], params)[0]
    texts = [c.text for c in out.completions]
    assert len(texts) == 4 and len(set(texts)) > 1
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
