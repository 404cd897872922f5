"""What a reply must look like: `response_format` and `tools` / `tool_choice` as a JSON grammar,
and a constrained tool call turned back into OpenAI's `tool_calls`.

A tool call is generated as one JSON object `{"name": ..., "arguments": {...}}` held by the
grammar to the allowed functions (`"required"`: any of them; a named function: that one) and
each one's `parameters` schema. When the chat template renders `tools`, it gets them; when it
does not (SmolLM2's), the functions are described to the model in a system message.
`tool_choice: "auto"` lets the model choose between text and a call, which needs a template
that renders tools: elsewhere it is a 400.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from kvcache.server.errors import APIError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
NO_ARGUMENTS = {"type": "object", "properties": {}}


def response_format_grammar(fmt: dict | None) -> tuple[dict | None, bool]:
    """(json_schema, json_object) for a `response_format`; anything else is a 400 naming it."""
    if fmt is None:
        return None, False
    kind = fmt.get("type")
    if kind == "text":
        return None, False
    if kind == "json_object":
        return None, True
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise APIError(400, "response_format.json_schema must be an object with a 'name' and a 'schema'.",
                           "response_format.json_schema")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object.",
                           "response_format.json_schema.schema")
        return schema, False
    raise APIError(400, f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                   "'json_schema'.", "response_format.type")


@dataclass
class ToolPlan:
    """How a request uses its tools: `schema` holds a forced call to one of `names`; with
    `auto` the model may answer in text or call (template-rendered tools, parsed after)."""

    functions: list[dict]  # OpenAI's `function` objects, checked
    names: list[str]
    schema: dict | None = None  # the grammar of a forced call (None with auto)
    auto: bool = False
    template_tools: list[dict] = field(default_factory=list)  # what the chat template is given

    @property
    def calls(self) -> bool:
        return self.schema is not None or self.auto


def _functions(tools: list[dict]) -> list[dict]:
    """Each tool's `function`, checked: a name of letters, digits, '_' and '-', parameters an object."""
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools.{i} must be {{'type': 'function', 'function': {{...}}}}.", f"tools.{i}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(400, f"tools.{i}.function.name must be 1-64 letters, digits, '_' or '-'.",
                           f"tools.{i}.function.name")
        params = fn.get("parameters", NO_ARGUMENTS)
        if not isinstance(params, dict):
            raise APIError(400, f"tools.{i}.function.parameters must be a JSON schema object.",
                           f"tools.{i}.function.parameters")
        out.append({**fn, "parameters": params})
    names = [f["name"] for f in out]
    if len(set(names)) != len(names):
        raise APIError(400, "Each tool needs its own function name.", "tools")
    return out


def call_schema(fn: dict) -> dict:
    """The JSON schema of one call of `fn`: its name and arguments under its parameters."""
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_plan(tools: list[dict] | None, choice, template_renders_tools: bool) -> ToolPlan | None:
    """The request's use of tools, or None when it calls none (no tools, or tool_choice 'none')."""
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None
    if not tools:
        raise APIError(400, "tool_choice needs a non-empty 'tools' list.", "tool_choice")
    functions = _functions(tools)
    names = [f["name"] for f in functions]
    rendered = [{"type": "function", "function": f} for f in functions] if template_renders_tools else []
    if choice == "auto":
        if not template_renders_tools:
            raise APIError(400, "tool_choice 'auto' needs a chat template that renders tools, and this model's "
                           "does not; use 'required', name a function, or 'none'.", "tool_choice")
        return ToolPlan(functions, names, auto=True, template_tools=rendered)
    if choice == "required":
        schemas = [call_schema(f) for f in functions]
        return ToolPlan(functions, names, schemas[0] if len(schemas) == 1 else {"anyOf": schemas},
                        template_tools=rendered)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(named, str)):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                       "'function': {'name': ...}}.", "tool_choice")
    if named not in names:
        raise APIError(400, f"tool_choice names the function {named!r}, which is not in tools.", "tool_choice")
    fn = functions[names.index(named)]
    return ToolPlan([fn], [named], call_schema(fn), template_tools=rendered)


def tools_system_text(plan: ToolPlan) -> str:
    """The functions described for a template that does not render tools."""
    specs = "\n".join(json.dumps({k: f[k] for k in ("name", "description", "parameters") if k in f},
                                  separators=(",", ":"), ensure_ascii=False) for f in plan.functions)
    return ("You can call these functions:\n" + specs + '\nTo call one, reply with JSON: {"name": <function '
            'name>, "arguments": <its arguments>}.')


def with_tools_prompt(messages: list[dict], plan: ToolPlan) -> list[dict]:
    """`messages` with the functions described in the system message (one is added first if none)."""
    text = tools_system_text(plan)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_calls(text: str, plan: ToolPlan) -> list[dict] | None:
    """OpenAI `tool_calls` from a reply: the whole reply one call (forced), or its
    <tool_call>...</tool_call> blocks (auto); None when it holds no call of an allowed function."""
    pieces = [text] if plan.schema is not None else TOOL_CALL_BLOCK.findall(text)
    calls = []
    for piece in pieces:
        try:
            call = json.loads(piece)
        except ValueError:
            return None
        if not isinstance(call, dict) or call.get("name") not in plan.names:
            return None
        args = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls or None


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template shows a `tools` list to the model (its text changes with one)."""
    probe = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "probe_fn", "parameters": NO_ARGUMENTS}}
    try:
        plain = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        shown = tokenizer.apply_chat_template(probe, tools=[tool], add_generation_prompt=True, tokenize=False)
    except Exception:  # no template, or one that refuses tools
        return False
    return shown != plain
