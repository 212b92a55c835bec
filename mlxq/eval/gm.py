"""`mlxq eval gm SCENARIOS.jsonl MODEL...`: how well a model runs an umigame (lateral-thinking puzzle) game.

Each scenario is played as the game plays it: one `Session` per scenario, the hidden story in the system prompt
and as the session's secrets, the puzzle's question as public text, every scripted player question asked in
turn with the answer schema (constrained decoding; `free=True` asks for the JSON in the prompt only and parses
what comes back). Per turn it records:

- the answer against the expected one (yes / no / irrelevant) and `solved` against whether the question solves;
- JSON validity (a complete object of the schema's fields and types) and empty answers;
- leaks of the hidden story: a verbatim span of LEAK_SPAN normalised characters of a story sentence that the
  player has not seen (not in the question, the instructions or the player's own questions so far), and the
  share of the answer's character NGRAM-grams that occur in the story but nowhere in that public text;
- a Japanese-quality proxy: the share of letters in Japanese script, and repetition loops (a unit of up to
  10 characters repeated at least 4 times over LOOP_CHARS or more, such as 「男は男は男は男は…」);
- time to first token and decode tokens/s.

Scenarios are JSON lines: {"title", "question", "story": [sentences], "turns": [{"ask", "answer", "solves"}]},
optionally "id", "difficulty" and "core" (what counts as solving, told to the game master).
"""

from __future__ import annotations

import json
import re
import statistics
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlxq.engine.guards import normalize
from mlxq.errors import GenerationError, InvalidRequest

ANSWERS = ("yes", "no", "irrelevant")
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": list(ANSWERS)},
        "solved": {"type": "boolean"},
        "comment": {"type": "string", "maxLength": 60},
    },
    "required": ["answer", "solved", "comment"],
    "additionalProperties": False,
}
LEAK_SPAN = 8  # normalised characters: the Session guard's default span
NGRAM = 4
LOOP = re.compile(r"(.{1,10}?)\1{3,}", re.DOTALL)
LOOP_CHARS = 12
MAX_TOKENS = 96


def system_prompt(question: str, story: list[str], core: str | None = None, free: bool = False) -> str:
    """The game master's instructions: the puzzle, the hidden story, the answer format."""
    solved = f"プレイヤーが真相の核心{f'（{core}）' if core else ''}を言い当てたら true"
    text = f"""あなたは水平思考パズル（ウミガメのスープ）のゲームマスターです。

問題: {question}

真相（プレイヤーには絶対に教えないこと）: {"".join(story)}

プレイヤーの質問に、真相に照らして答えてください。
- answer: "yes"（はい）、"no"（いいえ）、"irrelevant"（関係ありません）のどれか
- solved: {solved}
- comment: 短い日本語のひとこと。真相の文章をそのまま書かないこと。
"""
    if free:
        text += '\n次の形の JSON だけを返してください: {"answer": "yes", "solved": false, "comment": "..."}\n'
    return text


# ---------------------------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Turn:
    ask: str
    answer: str  # yes | no | irrelevant
    solves: bool


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    question: str
    story: tuple[str, ...]
    turns: tuple[Turn, ...]
    difficulty: str | None = None
    core: str | None = None


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{where}: field '{key}' must be a non-empty string")
    return value


def parse_scenario(obj: Any, where: str) -> Scenario:
    """One scenario from a decoded JSON line; `where` ("file:line") starts every error message."""
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{where}: expected a JSON object")
    title, question = _text(obj, "title", where), _text(obj, "question", where)
    story = obj.get("story")
    if not isinstance(story, list) or not story:
        raise InvalidRequest(f"{where}: field 'story' must be a non-empty list of sentences")
    for i, sentence in enumerate(story):
        if not isinstance(sentence, str) or not sentence.strip():
            raise InvalidRequest(f"{where}: field 'story[{i}]' must be a non-empty string")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        raise InvalidRequest(f"{where}: field 'turns' must be a non-empty list")
    parsed = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise InvalidRequest(f"{where}: field 'turns[{i}]' must be an object")
        ask = _text(t, "ask", f"{where}: turns[{i}]")
        if t.get("answer") not in ANSWERS:
            raise InvalidRequest(f"{where}: field 'turns[{i}].answer' must be one of {', '.join(ANSWERS)}")
        if not isinstance(t.get("solves"), bool):
            raise InvalidRequest(f"{where}: field 'turns[{i}].solves' must be true or false")
        parsed.append(Turn(ask, t["answer"], t["solves"]))
    for key in ("id", "difficulty", "core"):
        if key in obj and not isinstance(obj[key], str):
            raise InvalidRequest(f"{where}: field '{key}' must be a string")
    return Scenario(obj.get("id") or title, title, question, tuple(story), tuple(parsed), obj.get("difficulty"),
                    obj.get("core"))


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Every scenario of a JSONL file (blank lines skipped); a bad line is one error naming file, line, field."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidRequest(f"{p}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{p}: cannot read as UTF-8 text ({e.__class__.__name__})") from None
    out, ids = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        s = parse_scenario(obj, where)
        if s.id in ids:
            raise InvalidRequest(f"{where}: field 'id': '{s.id}' is used by an earlier scenario")
        ids.add(s.id)
        out.append(s)
    if not out:
        raise InvalidRequest(f"{p}: no scenarios in the file")
    return out


# ---------------------------------------------------------------------------------------------- text metrics
def leaked_span(text: str, story: list[str] | tuple[str, ...], public: list[str]) -> str:
    """The longest stretch (normalised) of a story sentence in `text` that is LEAK_SPAN characters or longer and
    whose every LEAK_SPAN-character window is absent from the public text; "" when there is none."""
    said, seen = normalize(text), "\x00".join(normalize(p) for p in public)
    best = ""
    for sentence in (normalize(s) for s in story):
        i = 0
        while i + LEAK_SPAN <= len(said):
            j = i + LEAK_SPAN
            if said[i:j] in sentence and said[i:j] not in seen:
                while j < len(said) and said[i : j + 1] in sentence and said[j + 1 - LEAK_SPAN : j + 1] not in seen:
                    j += 1
                best = max(best, said[i:j], key=len)
                i = j
            else:
                i += 1
    return best


def _ngrams(text: str) -> set[str]:
    return {text[i : i + NGRAM] for i in range(len(text) - NGRAM + 1)}


def story_overlap(text: str, story: list[str] | tuple[str, ...], public: list[str]) -> float:
    """Share of the text's character n-grams (normalised) found in the story and in none of the public texts."""
    grams = _ngrams(normalize(text))
    if not grams:
        return 0.0
    seen = set().union(*(_ngrams(normalize(p)) for p in public))
    secret = set().union(*(_ngrams(normalize(s)) for s in story)) - seen
    return len(grams & secret) / len(grams)


def _japanese(c: str) -> bool:
    name = unicodedata.name(c, "")
    return name.startswith(("HIRAGANA", "KATAKANA", "CJK UNIFIED", "HALFWIDTH KATAKANA")) or c in "々〆ヵヶー"


def japanese_share(text: str) -> float | None:
    """Share of the letters in Japanese script (kana, kanji); None when there are no letters."""
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    return sum(map(_japanese, letters)) / len(letters) if letters else None


def repetition_loop(text: str) -> str | None:
    """The first run of one short unit repeated at least 4 times over LOOP_CHARS or more characters."""
    for m in LOOP.finditer(text):
        if len(m.group(0)) >= LOOP_CHARS:
            return m.group(0)
    return None


def parse_reply(text: str) -> dict | None:
    """The answer object in a free-form reply (code fences and text around it allowed), if it is valid."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        obj = json.loads(text[start : end + 1])
    except ValueError:
        return None
    ok = isinstance(obj, dict) and obj.get("answer") in ANSWERS and isinstance(obj.get("solved"), bool)
    return obj if ok and isinstance(obj.get("comment", ""), str) else None


# ---------------------------------------------------------------------------------------------- playing
@dataclass
class TurnResult:
    scenario: str
    turn: int
    expected: str
    solves: bool
    answer: str | None = None
    solved: bool | None = None
    comment: str = ""
    raw: str = ""
    valid_json: bool = False
    empty: bool = False
    leak: str = ""  # the longest verbatim leaked span, normalised
    overlap: float = 0.0
    japanese: float | None = None
    loop: str | None = None
    ttft_s: float | None = None
    decode_tps: float | None = None
    generated_tokens: int = 0
    retried: bool = False
    error: str | None = None


Script = Callable[[Scenario, int], list]  # (scenario, turn index) -> extra logits processors (a scripted model)


def play(model, scenario: Scenario, *, guard: bool = True, free: bool = False, max_tokens: int = MAX_TOKENS,
         script: Script | None = None, on_turn: Callable[[TurnResult], None] | None = None,
         **sampling: Any) -> list[TurnResult]:
    """Plays one scenario's scripted turns in one Session; `guard` turns on the Session's secret guard (as the
    game ships), `script` adds logits processors per turn (tests script a model that answers as told)."""
    from mlxq.session import Session

    instructions = system_prompt(scenario.question, list(scenario.story), scenario.core, free)
    public = [scenario.question, system_prompt(scenario.question, [], None, free)]  # without story and core
    session = Session(model, system=instructions, secrets=list(scenario.story) if guard else None,
                      public=public if guard else None, min_span=LEAK_SPAN, enable_thinking=False,
                      max_tokens=max_tokens, **sampling)
    results = []
    for i, turn in enumerate(scenario.turns):
        public.append(turn.ask)
        r = TurnResult(scenario.id, i, turn.answer, turn.solves)
        procs = script(scenario, i) if script else None
        try:
            reply = session.ask(turn.ask, None if free else SCHEMA, logits_processors=procs)
        except GenerationError as e:
            r.error = str(e)
            r.empty = "empty answer" in r.error  # Session says which: empty twice, or the JSON left incomplete
        else:
            obj = parse_reply(reply) if free else reply
            r.raw = reply if free else json.dumps(reply, ensure_ascii=False)
            r.valid_json = obj is not None
            if obj is not None:
                r.answer, r.solved, r.comment = obj["answer"], obj["solved"], obj.get("comment", "")
            r.empty = not r.raw.strip()  # a JSON answer with an empty comment still answers
        said = r.comment if r.valid_json else r.raw
        r.leak = leaked_span(said, scenario.story, public)
        r.overlap = story_overlap(said, scenario.story, public)
        r.japanese = japanese_share(said)
        r.loop = repetition_loop(said)
        if session.stats:
            s = session.stats[-1]
            r.ttft_s, r.generated_tokens, r.retried = s.first_token_s, s.generated_tokens, s.retried
            if s.generated_tokens > 1 and s.total_s > s.first_token_s:
                r.decode_tps = (s.generated_tokens - 1) / (s.total_s - s.first_token_s)
        results.append(r)
        if on_turn is not None:
            on_turn(r)
    return results


def evaluate(model, scenarios: list[Scenario], label: str | None = None, **options: Any) -> Summary:
    """Plays every scenario (options as for `play`) and summarises the turns under `label`."""
    results = []
    for scenario in scenarios:
        results += play(model, scenario, **options)
    return summarize(label or model.name, results)


@dataclass
class Summary:
    model: str
    turns: int
    accuracy: float  # answers equal to the expected one
    solve_recall: float | None  # solving questions flagged solved
    false_solves: float | None  # other questions flagged solved
    json_valid: float
    empty: float
    leak_rate: float  # turns with a verbatim leak
    story_overlap: float  # mean share of story-only n-grams
    japanese: float | None  # mean share of Japanese script
    loops: float  # turns with a repetition loop
    ttft_s: float | None  # median
    decode_tps: float | None  # median
    retried: int = 0
    per_turn: list[dict] = field(default_factory=list)


def _rate(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(model: str, results: list[TurnResult]) -> Summary:
    solving = [r for r in results if r.solves]
    others = [r for r in results if not r.solves]
    ja = [r.japanese for r in results if r.japanese is not None]
    return Summary(
        model=model,
        turns=len(results),
        accuracy=_rate([r.answer == r.expected for r in results]) or 0.0,
        solve_recall=_rate([r.solved is True for r in solving]),
        false_solves=_rate([r.solved is True for r in others]),
        json_valid=_rate([r.valid_json for r in results]) or 0.0,
        empty=_rate([r.empty for r in results]) or 0.0,
        leak_rate=_rate([bool(r.leak) for r in results]) or 0.0,
        story_overlap=statistics.fmean([r.overlap for r in results]) if results else 0.0,
        japanese=statistics.fmean(ja) if ja else None,
        loops=_rate([r.loop is not None for r in results]) or 0.0,
        ttft_s=_median([r.ttft_s for r in results]),
        decode_tps=_median([r.decode_tps for r in results]),
        retried=sum(r.retried for r in results),
        per_turn=[asdict(r) for r in results],
    )


# ---------------------------------------------------------------------------------------------- output
COLUMNS = [  # (Summary field, header, format): the table's and the plot's columns
    ("accuracy", "accuracy", "{:.0%}"),
    ("solve_recall", "solves found", "{:.0%}"),
    ("false_solves", "false solves", "{:.0%}"),
    ("json_valid", "JSON valid", "{:.0%}"),
    ("empty", "empty", "{:.0%}"),
    ("leak_rate", "leaks", "{:.0%}"),
    ("story_overlap", "story n-grams", "{:.1%}"),
    ("japanese", "Japanese", "{:.0%}"),
    ("loops", "loops", "{:.0%}"),
    ("ttft_s", "TTFT s", "{:.2f}"),
    ("decode_tps", "tok/s", "{:.1f}"),
]


def show(summaries: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="umigame game-master evaluation", title_justify="left")
    table.add_column("model")
    table.add_column("turns", justify="right")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for s in summaries:
        cells = [fmt.format(s[key]) if s[key] is not None else "-" for key, _, fmt in COLUMNS]
        table.add_row(s["model"], str(s["turns"]), *cells)
    console.print(table)


def plot(summaries: list[dict], path: str) -> Path:
    """Rates side by side per model (higher is better for the first four, lower for the rest), and speed."""
    from mlxq.eval.report import pyplot, save_figure

    plt = pyplot()
    rates = [c for c in COLUMNS if c[0] not in ("ttft_s", "decode_tps")]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 5), width_ratios=[4, 1, 1], layout="constrained")
    width = 0.8 / max(len(summaries), 1)
    for k, s in enumerate(summaries):
        xs = [i + k * width for i in range(len(rates))]
        left.bar(xs, [s[key] or 0.0 for key, _, _ in rates], width, label=f"{k + 1}: {s['model']}", color=f"C{k}")
        mid.bar([k], [s["ttft_s"] or 0.0], color=f"C{k}")
        right.bar([k], [s["decode_tps"] or 0.0], color=f"C{k}")
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(rates))], [h for _, h, _ in rates], rotation=30)
    left.set_ylim(0, 1.05)
    left.set_title("rates per turn")
    fig.legend(loc="outside lower center", ncol=min(len(summaries), 3), fontsize=8)
    for ax, title in ((mid, "median time to first token (s)"), (right, "median decode tok/s")):
        ax.set_xticks(range(len(summaries)), [str(i + 1) for i in range(len(summaries))])
        ax.set_xlabel("model")
        ax.set_title(title, fontsize=9)
    fig.suptitle("mlxq eval gm")
    return save_figure(fig, path)
