"""Tool calls in the format the model's chat template teaches, rendered, constrained and parsed.

Two formats, told apart by the template itself:

- Hermes / Qwen2.5 / Qwen3: a JSON object per call,
  `<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>`.
- Qwen3-Coder / Qwen3.5: XML-like, one parameter per block, strings written raw and other values as JSON,
  `<tool_call>\\n<function=get_weather>\\n<parameter=city>\\nParis\\n</parameter>\\n</function>\\n</tool_call>`.

`tool_choice: "auto"` renders the tools into the prompt and parses whatever calls the model writes.
`"required"` or a named function constrains decoding with an llguidance grammar to exactly one call in the
template's format whose arguments follow the function's parameters, so the call always parses. `"none"` leaves
the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import llguidance

from mlxq.engine.constraints import JSON_OPTIONS, token_tables
from mlxq.engine.tokenizer import Tokenizer
from mlxq.errors import InvalidRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_XML_FUNCTION = re.compile(r"^<function=([^>\n]+)>\s*(.*?)\s*(?:</function>\s*)?$", re.DOTALL)
_UNSAFE = re.compile(r"[<>=\n\r]")  # a name with these would break the tags it is written into
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict  # JSON schema of the arguments (an object)

    def parameter_type(self, name: str) -> Any:
        return ((self.parameters.get("properties") or {}).get(name) or {}).get("type")


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict] | None  # passed to the chat template (None: no tools in the prompt)
    grammar: str | None  # forces one call (required / named function)
    functions: tuple[Function, ...] = ()  # what the output is parsed against (empty: no parsing)
    xml: bool = False  # the template's format: XML parameters (Qwen3-Coder / Qwen3.5) or Hermes JSON


def uses_xml_calls(tokenizer: Tokenizer) -> bool:
    """Whether the chat template teaches the XML call format (`<function=...>`) rather than Hermes JSON."""
    return "<function=" in (tokenizer.hf.chat_template or "")


def plan_tools(
    tokenizer: Tokenizer, tools: list[dict] | None, tool_choice: str | dict | None, *, after_think: bool = False
) -> ToolPlan:
    """How to render, constrain and parse a request's tools. `after_think`: a forced call follows a think block
    (and the blank line after it)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice: needs tools")
        return ToolPlan(None, None)
    if not isinstance(tools, list):
        raise InvalidRequest("tools: must be a list of {'type': 'function', 'function': {...}}")
    functions = tuple(_function(t, i) for i, t in enumerate(tools))
    if "tools" not in (tokenizer.hf.chat_template or ""):
        raise InvalidRequest("tools: this model's chat template does not support tools")
    xml = uses_xml_calls(tokenizer)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(None, None)
    if choice == "auto":
        return ToolPlan(tools, None, functions, xml)
    if choice == "required":
        chosen = functions
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest("tool_choice: must be {'type': 'function', 'function': {'name': ...}}")
        chosen = tuple(f for f in functions if f.name == name)
        if not chosen:
            raise InvalidRequest(f"tool_choice: names function {name!r}, which is not in tools")
    else:
        raise InvalidRequest("tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', ...}")
    return ToolPlan(tools, tool_grammar(tokenizer, chosen, xml=xml, leading_newlines=after_think), functions, xml)


def _function(tool: Any, i: int) -> Function:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequest(f"tools[{i}]: must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
    params = fn.get("parameters") or {"type": "object"}
    if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
        raise InvalidRequest(f"tools[{i}].function.parameters: must be a JSON schema object")
    names = [fn["name"], *params.get("properties", {})]
    if any(not isinstance(n, str) or not n or _UNSAFE.search(n) for n in names):
        raise InvalidRequest(f"tools[{i}].function: names must be non-empty, without '<', '>', '=' or line breaks")
    return Function(fn["name"], params)


# ------------------------------------------------------------------------------------------------ grammars
def tool_grammar(
    tokenizer: Tokenizer, functions: tuple[Function, ...], *, xml: bool = False, leading_newlines: bool = False
) -> str:
    """An llguidance grammar for exactly one tool-call block calling one of `functions`, in the template's
    format."""
    tables = token_tables(tokenizer)
    # A special token is named <like_this> in the grammar; plain text is quoted.
    tag = {t: (t if tables.id_of(t) is not None else json.dumps(t)) for t in (OPEN, CLOSE)}
    prefix = "/\\n{0,2}/ " if leading_newlines else ""  # the newlines a template writes after `</think>`
    try:
        body = _xml_rules(functions) if xml else _json_rules(functions)
        lark = f'start: {prefix}{tag[OPEN]} "\\n" call "\\n" {tag[CLOSE]}\n{body}'
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, tables.ll)
    except (ValueError, TypeError, RuntimeError, RecursionError) as e:
        error = str(e) or type(e).__name__
    if error:
        first = error.splitlines()[0][:300]
        raise InvalidRequest(f"tools: cannot build a grammar from the function parameters: {first}")
    return grammar


def _json_rules(functions: tuple[Function, ...]) -> str:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return f"call: %json {json.dumps({'anyOf': calls, 'x-guidance': JSON_OPTIONS})}"


def _xml_rules(functions: tuple[Function, ...]) -> str:
    """One rule per function: its parameters in declared order (optional ones may be left out); a string value
    is raw text on one line (`<` excluded, so it cannot run into the closing tag), any other value JSON."""
    rules = [f"call: {' | '.join(f'fn{i}' for i in range(len(functions)))}"]
    for i, f in enumerate(functions):
        props = f.parameters.get("properties") or {}
        listed = f.parameters.get("required") or []
        required = {r for r in listed if isinstance(r, str)} if isinstance(listed, list) else set()
        params = []
        for j, (name, schema) in enumerate(props.items()):
            value = f"v{i}_{j}"
            if isinstance(schema, dict) and "enum" in schema and all(isinstance(e, str) for e in schema["enum"]):
                rules.append(f"{value}: {' | '.join(_literal(e) for e in schema['enum'])}")
            elif isinstance(schema, dict) and schema.get("type") == "string":
                rules.append(f"{value}: /[^<\\n]+/")
            else:
                rules.append(f"{value}: %json {json.dumps({**(schema or {}), 'x-guidance': JSON_OPTIONS})}")
            block = f'{_literal(f"<parameter={name}>" + chr(10))} {value} "\\n</parameter>\\n"'
            params.append(block if name in required else f"({block})?")
        rules.append(f'fn{i}: {_literal(f"<function={f.name}>" + chr(10))} {" ".join(params)} "</function>"')
    return "\n".join(rules)


def _literal(text: str) -> str:
    """`text` as a string literal of the Lark grammar (JSON's quoting, characters kept as they are)."""
    return json.dumps(text, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ parsing
def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str, list[dict]]:
    """(content without the tool-call blocks, OpenAI `tool_calls`). A block that does not parse as a call stays
    in the content, as text."""
    calls, kept, last = [], [], 0
    known = {f.name: f for f in plan.functions}
    for m in _BLOCK.finditer(text):
        call = _xml_call(m.group(1), known) if plan.xml else _json_call(m.group(1))
        if call is None:
            continue
        name, args = call
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)},
            }
        )
        kept.append(text[last : m.start()])
        last = m.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def _json_call(block: str) -> tuple[str, Any] | None:
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return call["name"], call.get("arguments", call.get("parameters", {}))


def _xml_call(block: str, known: dict[str, Function]) -> tuple[str, dict] | None:
    m = _XML_FUNCTION.match(block)
    if m is None:
        return None
    name = m.group(1).strip()
    fn = known.get(name, Function(name, {}))
    args = {key.strip(): _xml_value(value, fn.parameter_type(key.strip())) for key, value in
            _XML_PARAMETER.findall(m.group(2))}
    return name, args


def _xml_value(raw: str, kind: Any) -> Any:
    """A parameter's value as the template wrote it: raw text for strings; JSON otherwise (the template writes
    Python's True / False / None for those, which are read back too)."""
    if kind == "string":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(raw.strip(), raw)


def template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as chat templates take it: arguments as an object (the API carries a JSON string)."""
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except (ValueError, RecursionError):
            pass
    return {**call, "function": fn}
