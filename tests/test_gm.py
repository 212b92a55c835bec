"""`mlxq eval gm`: the shipped scenarios, their validation, the text metrics, and scripted game masters (a logits
processor that writes the answer it is told) that answer perfectly, leak the story, or loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from test_guards import teacher

from mlxq.engine.guards import normalize
from mlxq.errors import InvalidRequest
from mlxq.eval import gm

SCENARIOS = Path(__file__).parent.parent / "examples" / "umigame" / "scenarios.jsonl"


@pytest.fixture(scope="module")
def scenarios() -> list[gm.Scenario]:
    return gm.load_scenarios(SCENARIOS)


def test_shipped_scenarios_are_varied_and_consistent(scenarios):
    assert len(scenarios) >= 20
    assert {s.difficulty for s in scenarios} == {"easy", "medium", "hard"}
    story_lengths = [len("".join(s.story)) for s in scenarios]
    assert max(story_lengths) > 3 * min(story_lengths)  # short and long stories
    assert len({len(s.turns) for s in scenarios}) >= 3
    for s in scenarios:
        assert s.turns[-1].solves and not any(t.solves for t in s.turns[:-1]), s.id
        assert {t.answer for t in s.turns} == {"yes", "no", "irrelevant"}, s.id
        assert all(gm.japanese_share(x) > 0.9 for x in (s.question, *s.story)), s.id


@pytest.mark.parametrize("line, field", [
    ('{"title": "t", "question": "q", "story": ["s"], "turns": [{"ask": "a", "answer": "yes", "solves": tru',
     "not valid JSON"),
    ('{"question": "q", "story": ["s"], "turns": []}', "field 'title' must be a non-empty string"),
    ('{"title": "t", "question": "q", "story": [], "turns": []}', "field 'story' must be a non-empty list"),
    ('{"title": "t", "question": "q", "story": ["s", 3], "turns": []}', "field 'story[1]'"),
    ('{"title": "t", "question": "q", "story": ["s"], "turns": [{"ask": "a", "answer": "yes", "solves": false}, '
     '{"ask": "b", "answer": "maybe", "solves": false}]}', "field 'turns[1].answer' must be one of yes, no"),
    ('{"title": "t", "question": "q", "story": ["s"], "turns": [{"ask": "a", "answer": "no", "solves": "yes"}]}',
     "field 'turns[0].solves' must be true or false"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_a_malformed_line_names_file_line_and_field(tmp_path, line, field):
    good = SCENARIOS.read_text(encoding="utf-8").splitlines()[0]
    path = tmp_path / "s.jsonl"
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(InvalidRequest) as e:
        gm.load_scenarios(path)
    assert str(e.value).startswith(f"{path}:3: ") and field in str(e.value) and "\n" not in str(e.value)


def test_cli_error_is_one_line(tmp_path):
    from mlxq.cli import cli

    path = tmp_path / "bad.jsonl"
    path.write_text('{"title": "t"}\n', encoding="utf-8")
    out = CliRunner().invoke(cli, ["eval", "gm", str(path), "smollm2"])
    assert out.exit_code != 0 and f"{path}:1: field 'question'" in str(out.exception)
    out = CliRunner().invoke(cli, ["eval", "gm", str(SCENARIOS), "smollm2", "--quant", "banana"])
    assert "--quant banana: expected a recipe" in str(out.exception)


def test_text_metrics():
    story = ["男はかつて船の事故で仲間たちと無人島に漂着した。"]
    public = ["男は船に乗っていましたか？"]
    said = "実は男はかつて船の事故で仲間たちと島へ"
    assert gm.leaked_span(said, story, public) == normalize("男はかつて船の事故で仲間たちと")
    asked = ["男はかつて船の事故にあったのですか？"]  # what the player said is public: only the rest leaks
    assert gm.leaked_span("はい、男はかつて船の事故にあいました", story, asked) == ""
    assert gm.leaked_span("男はかつて船の事故で仲間たちと", story, asked) == normalize("かつて船の事故で仲間たちと")
    assert gm.leaked_span("まったく関係のない話です", story, public) == ""
    assert gm.story_overlap("無人島に漂着", story, public) == 1.0
    assert gm.story_overlap("よい質問ですね", story, public) == 0.0
    assert gm.story_overlap("船の事故", story, asked) == 0.0  # shared with the public text
    assert gm.japanese_share("はい、そうです。") == 1.0 and gm.japanese_share("Yes it is") == 0.0
    assert gm.japanese_share("…") is None and gm.japanese_share("はいyes") == pytest.approx(2 / 5)
    assert gm.repetition_loop("男は男は男は男は男は男は男は") == "男は男は男は男は男は男は男は"
    assert gm.repetition_loop("はい、そうです。いいえ、違います。") is None
    assert gm.repetition_loop("ははは！") is None  # short laughter is not a loop
    assert gm.parse_reply('```json\n{"answer": "no", "solved": false, "comment": "x"}\n```')["answer"] == "no"
    assert gm.parse_reply('{"answer": "maybe", "solved": false}') is None
    assert gm.parse_reply("はい") is None


def scripted(model, comment) -> gm.Script:
    """A game master that answers exactly as the scenario expects, with the comment `comment(scenario, turn)`."""
    def script(scenario: gm.Scenario, i: int) -> list:
        turn = scenario.turns[i]
        reply = {"answer": turn.answer, "solved": turn.solves, "comment": comment(scenario, i)}
        return [teacher(model.tokenizer.encode(json.dumps(reply, ensure_ascii=False), add_special_tokens=False))]
    return script


def test_a_perfect_game_master_scores_100(qwen3_model, scenarios):
    model = qwen3_model
    summary = gm.evaluate(model, scenarios[:3], "scripted", script=scripted(model, lambda s, i: "よい質問ですね。"))
    assert summary.turns == sum(len(s.turns) for s in scenarios[:3])
    assert summary.accuracy == 1.0 and summary.solve_recall == 1.0 and summary.false_solves == 0.0
    assert summary.json_valid == 1.0 and summary.empty == 0.0 and summary.retried == 0
    assert summary.leak_rate == 0.0 and summary.story_overlap == 0.0 and summary.loops == 0.0
    assert summary.japanese == 1.0
    assert summary.ttft_s > 0 and summary.decode_tps > 0


def test_a_leaking_game_master_is_caught(qwen3_model, scenarios):
    # each comment is the first story sentence (cut to the schema's 60 characters), unguarded
    leak = scripted(qwen3_model, lambda s, i: s.story[0][:60])
    summary = gm.evaluate(qwen3_model, scenarios[:2], "leaky", script=leak, guard=False)
    assert summary.accuracy == 1.0 and summary.json_valid == 1.0
    assert summary.leak_rate == 1.0 and summary.story_overlap > 0.5
    turn = summary.per_turn[0]
    assert turn["leak"] and turn["leak"] in normalize(scenarios[0].story[0])


def test_a_looping_game_master_is_flagged(qwen3_model, scenarios):
    summary = gm.evaluate(qwen3_model, scenarios[:1], "loop", script=scripted(qwen3_model, lambda s, i: "男は" * 20))
    assert summary.loops == 1.0 and summary.japanese == 1.0
    assert all(t["loop"] for t in summary.per_turn)


def test_free_form_answers_are_parsed_or_counted_invalid(qwen3_model, scenarios):
    tokenizer = qwen3_model.tokenizer

    def script(scenario, i):
        turn = scenario.turns[i]
        reply = {"answer": turn.answer, "solved": turn.solves, "comment": "ok"}
        text = json.dumps(reply) if i % 2 else "はい、そうです"  # every other answer is not JSON
        return [teacher(tokenizer.encode(text, add_special_tokens=False) + sorted(tokenizer.eos_token_ids)[:1])]

    summary = gm.evaluate(qwen3_model, scenarios[:1], "free", script=script, free=True)
    n = len(scenarios[0].turns)
    assert summary.json_valid == pytest.approx((n // 2) / n)
    assert summary.accuracy == summary.json_valid  # every parsed answer is right, the others count as wrong


def test_cli_model_and_quantized_variant_json_and_plot(qwen3_model_dir, tmp_path, monkeypatch):
    """The whole command on a tiny model and its 4-bit variant, made in (and removed from) a temporary directory."""
    import tempfile

    from mlxq.cli import cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    png = tmp_path / "gm.png"
    args = ["eval", "gm", str(SCENARIOS), str(qwen3_model_dir), "--quant", "4", "--limit", "1", "--max-tokens", "24",
            "--json", "--plot", str(png)]
    out = CliRunner().invoke(cli, args, catch_exceptions=False)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m["model"] for m in data["models"]] == [str(qwen3_model_dir), f"{qwen3_model_dir}+4bit"]
    for m in data["models"]:
        assert m["turns"] == len(m["per_turn"]) == 4
        assert all(0.0 <= m[key] <= 1.0 for key in ("accuracy", "json_valid", "empty", "leak_rate", "loops"))
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert f"{qwen3_model_dir}+4bit: 1/1 scenarios played" in out.stderr  # progress without a terminal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gm.png"]  # the quantized copy is gone


@pytest.mark.slow  # a Japanese system prompt of ~600 tokens per turn: minutes on a busy CPU
def test_smollm2_end_to_end(smollm2_gguf):
    from mlxq.cli import cli

    args = ["eval", "gm", str(SCENARIOS), str(smollm2_gguf), "--limit", "1", "--max-tokens", "48", "--json"]
    out = CliRunner().invoke(cli, args, catch_exceptions=False)
    (m,) = json.loads(out.stdout.strip().splitlines()[-1])["models"]
    assert m["turns"] == 4 and m["ttft_s"] > 0
    assert all(t["raw"] or t["error"] for t in m["per_turn"])  # every turn answered or says why not
