"""Tool calls in the Hermes / Qwen format the common chat templates teach: the model writes
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.

`tool_choice: "auto"` renders the tools into the prompt and parses whatever blocks the model writes.
`"required"` or a named function constrains decoding with an llguidance grammar to exactly one such block whose
JSON validates against the function's parameters, so the call always parses. `"none"` leaves the tools out of
the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import llguidance

from mlxq.engine.constraints import token_tables
from mlxq.engine.tokenizer import Tokenizer
from mlxq.errors import InvalidRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolPlan:
    tools: list[dict] | None  # passed to the chat template (None: no tools in the prompt)
    grammar: str | None  # forces one call (required / named function)
    parse: bool  # look for tool-call blocks in the output


def plan_tools(
    tokenizer: Tokenizer, tools: list[dict] | None, tool_choice: str | dict | None, *, after_think: bool = False
) -> ToolPlan:
    """How to render and constrain a request's tools. `after_think`: a forced call follows a think block (and the
    blank line after it)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice: needs tools")
        return ToolPlan(None, None, False)
    functions = [_function(t, i) for i, t in enumerate(tools)]
    if "tools" not in (tokenizer.hf.chat_template or ""):
        raise InvalidRequest("tools: this model's chat template does not support tools")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(None, None, False)
    if choice == "auto":
        return ToolPlan(tools, None, True)
    if choice == "required":
        return ToolPlan(tools, tool_grammar(tokenizer, functions, leading_newlines=after_think), True)
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest("tool_choice: must be {'type': 'function', 'function': {'name': ...}}")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise InvalidRequest(f"tool_choice: names function {name!r}, which is not in tools")
        return ToolPlan(tools, tool_grammar(tokenizer, chosen, leading_newlines=after_think), True)
    raise InvalidRequest("tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', ...}")


def _function(tool: Any, i: int) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"tools[{i}]: must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
    params = fn.get("parameters") or {"type": "object"}
    if not isinstance(params, dict):
        raise InvalidRequest(f"tools[{i}].function.parameters: must be a JSON schema object")
    return {"name": fn["name"], "parameters": params}


def tool_grammar(tokenizer: Tokenizer, functions: list[dict], *, leading_newlines: bool = False) -> str:
    """An llguidance grammar for exactly one tool-call block calling one of `functions`."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = {
        "anyOf": calls,
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    }
    tables = token_tables(tokenizer)
    # A special token is named <like_this> in the grammar; plain text is quoted.
    tag = {t: (t if tables.id_of(t) is not None else json.dumps(t)) for t in (OPEN, CLOSE)}
    prefix = "/\\n{0,2}/ " if leading_newlines else ""  # the newlines a template writes after `</think>`
    lark = f'start: {prefix}{tag[OPEN]} "\\n" call "\\n" {tag[CLOSE]}\ncall: %json {json.dumps(schema)}'
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, tables.ll)
    except (ValueError, TypeError, RuntimeError) as e:
        error = str(e)
    if error:
        raise InvalidRequest(f"tools: cannot build a grammar from the function parameters: {error}")
    return grammar


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content without the tool-call blocks, OpenAI `tool_calls`). A block that is not valid JSON with a
    name stays in the content, as text."""
    calls, kept, last = [], [], 0
    for m in _BLOCK.finditer(text):
        try:
            call = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        args = call.get("arguments", call.get("parameters", {}))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
            }
        )
        kept.append(text[last : m.start()])
        last = m.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls
