"""What a plain string prompt means: the user's turn through the chat template when the model has one (as
`mlxq generate` and Ollama's generate read it), raw text with `raw=True` / `--raw` or without a template, and always
raw text on the server's /v1/completions (the OpenAI contract)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from test_server import MODEL, serving
from tiny import make_tiny, save_tiny_tokenizer

import mlxq
from mlxq import cli
from mlxq.errors import InvalidRequest

STORY = "Write a short story about a cat in three sentences."  # SmolLM2-Instruct ends this raw text at once


def as_message(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_plain_string_is_a_user_message_on_smollm2(smollm2):
    """The instruct model answers the string, token for token as the explicit user message (and streams the same
    text); raw=True is the text itself, which this model ends at once (the old reading of a string)."""
    asked = smollm2.generate(STORY, max_tokens=24)
    told = smollm2.generate(as_message(STORY), max_tokens=24)
    assert asked.text.strip() and asked.tokens == told.tokens and asked.text == told.text
    assert "".join(c.text for c in smollm2.stream(STORY, max_tokens=24)) == asked.text
    raw = smollm2.generate(STORY, max_tokens=24, raw=True)
    assert raw.tokens == smollm2.generate(smollm2.tokenizer.encode(STORY), max_tokens=24).tokens
    assert raw.text == "" and raw.finish_reason == "stop"


def test_server_completions_stay_raw_text(smollm2):
    """/v1/completions continues the text as it is: the API's raw answer, not its chat answer."""
    with serving(smollm2) as live:
        served = live.client.completions.create(model=MODEL, prompt=STORY, max_tokens=12, temperature=0)
    raw = smollm2.generate(STORY, max_tokens=12, raw=True)
    assert served.usage.prompt_tokens == len(smollm2.tokenizer.encode(STORY))
    assert served.choices[0].text == raw.text and served.usage.completion_tokens == len(raw.tokens)
    assert smollm2.generate(STORY, max_tokens=12).text != raw.text  # the two readings differ on this prompt


def test_the_rule_on_a_template_with_thinking(qwen3_model):
    """A string gets everything a user message gets (Qwen3's template and its thinking control); raw text and token
    ids are taken as they are; raw chat messages and empty text are errors."""
    model, text = qwen3_model, "Is the man in the story alive?"
    assert model.encode_prompt(text) == model.encode_prompt(as_message(text)) \
        == model.tokenizer.apply_chat_template(as_message(text))
    assert model.encode_prompt(text, raw=True) == model.tokenizer.encode(text)
    asked, told = model.generate(text, max_tokens=10), model.generate(as_message(text), max_tokens=10)
    assert asked.tokens == told.tokens and asked.reasoning == told.reasoning
    ids = model.tokenizer.encode(text)
    assert model.generate(text, max_tokens=10, raw=True).tokens == model.generate(ids, max_tokens=10).tokens
    with pytest.raises(InvalidRequest, match="raw: applies to a text prompt"):
        model.generate(as_message(text), raw=True)
    with pytest.raises(InvalidRequest, match="prompt: must not be empty"):
        model.generate("")


def test_a_model_without_a_template_reads_text_raw(tmp_path):
    make_tiny("llama", tmp_path)
    save_tiny_tokenizer(tmp_path, 160)
    model = mlxq.load(str(tmp_path))
    assert not model.tokenizer.has_chat_template
    assert model.encode_prompt("the fox") == model.tokenizer.encode("the fox")
    assert model.generate("the fox", max_tokens=6).tokens == model.generate("the fox", max_tokens=6, raw=True).tokens


def test_the_command_line_reads_it_alike(smollm2, monkeypatch):
    """`mlxq generate TEXT` prints the API's answer to the string; with --raw the model's raw answer, and when that
    is empty on a model with a chat template, a one-line hint on stderr; --system with --raw is a one-line error."""
    monkeypatch.setattr(cli, "load_for_cli", lambda *args, **kwargs: smollm2)
    runner = CliRunner()
    chat = runner.invoke(cli.cli, ["generate", STORY, "-n", "12"])
    assert chat.exit_code == 0 and chat.stdout.strip()
    assert chat.stdout == smollm2.generate(STORY, max_tokens=12).text + "\n"
    assert chat.stderr == ""
    raw = runner.invoke(cli.cli, ["generate", STORY, "-n", "12", "--raw"])
    assert raw.exit_code == 0 and raw.stdout == "\n"
    assert raw.stderr.splitlines() == ["[no answer to the raw text; without --raw the prompt goes to the model as a "
                                       "user message]"]
    both = runner.invoke(cli.cli, ["generate", STORY, "--raw", "--system", "Be brief."])
    assert isinstance(both.exception, InvalidRequest) and "--system" in str(both.exception)
