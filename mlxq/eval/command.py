"""`mlxq eval ppl MODEL` and `mlxq eval kl MODEL --ref SRC`: quality of a (quantized) model on a text;
`mlxq eval gm SCENARIOS.jsonl MODEL...`: the umigame game-master evaluation (mlxq.eval.gm)."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from mlxq.eval.metrics import CTX, MAX_TOKENS, Scores


def _text_options(f):
    for opt in reversed(
        [
            click.option(
                "--text",
                "text_file",
                default=None,
                metavar="FILE",
                help="UTF-8 text to score (default: held-back Wikipedia text of the pinned corpus).",
            ),
            click.option("--ctx", default=CTX, show_default=True, type=click.IntRange(2), help="Tokens per window."),
            click.option(
                "--max-tokens",
                default=MAX_TOKENS,
                show_default=True,
                type=click.IntRange(2),
                help="Score at most this many tokens of the text.",
            ),
            click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table."),
        ]
    ):
        f = opt(f)
    return f


@click.group("eval")
def eval() -> None:  # the CLI verb; shadows the builtin in this module only
    """Perplexity and KL divergence of a model on a text; the umigame game-master evaluation."""


@eval.command()
@click.argument("model")
@_text_options
def ppl(model: str, text_file: str | None, ctx: int, max_tokens: int, as_json: bool) -> None:
    """Perplexity of MODEL on a text."""
    scores = run(model, None, text_file, ctx, max_tokens)
    show(model, None, scores, as_json)


@eval.command()
@click.argument("model")
@click.option("--ref", required=True, metavar="SRC", help="The reference model (e.g. the unquantized source).")
@_text_options
def kl(model: str, ref: str, text_file: str | None, ctx: int, max_tokens: int, as_json: bool) -> None:
    """KL divergence of MODEL from a reference, top-1 agreement and perplexity."""
    scores = run(model, ref, text_file, ctx, max_tokens)
    show(model, ref, scores, as_json)


def run(
    model: str, ref: str | None, text_file: str | None, ctx: int = CTX, max_tokens: int = MAX_TOKENS, console=None
) -> Scores:
    """Score `model` (against `ref` when given) on a text file or the held-back corpus text."""
    import mlx.core as mx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mlxq.eval.metrics import load_for_eval, reference, score, windows
    from mlxq.formats.texts import heldout_text, read_text_file

    console = console or Console(stderr=True)
    text = read_text_file(text_file) if text_file else heldout_text()
    m = load_for_eval(model)
    wins = windows(m.tokenizer.encode(text, add_special_tokens=False), ctx, max_tokens)
    total = sum(len(w) for w in wins)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        console=console,
        transient=True,
    ) as bar:
        ref_lp = None
        if ref is not None:
            r = load_for_eval(ref)
            task = bar.add_task("reference", total=total)
            ref_lp = reference(lambda w: r.logits(w), wins)
            bar.update(task, completed=total)
            del r
            mx.clear_cache()
        task = bar.add_task("scoring", total=total)
        return score(lambda w: m.logits(w), wins, ref_lp, progress=lambda n: bar.advance(task, n))


def show(model: str, ref: str | None, scores: Scores, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"model": model, "ref": ref, **scores.as_dict()}))
        return
    rows = [("model", model), ("tokens", str(scores.tokens)), ("perplexity", f"{scores.ppl:.4f}")]
    if scores.kl is not None:
        rows += [
            ("reference", ref),
            ("ref perplexity", f"{scores.ref_ppl:.4f}"),
            ("mean KL", f"{scores.kl:.5f} nats/token"),
            ("KL p99", f"{scores.kl_p99:.5f}"),
            ("top-1 agreement", f"{100 * scores.top1:.2f} %"),
        ]
    for key, value in rows:
        click.echo(f"{key:>15}  {value}")


@eval.command()
@click.argument("scenarios", metavar="SCENARIOS.jsonl")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--quant", "--recipe", "variants", multiple=True, metavar="RECIPE|BITS",
              help="Also evaluate each MODEL quantized with this recipe (e.g. q3_k_m) or uniform bits (e.g. 4), "
              "made into a temporary directory (repeatable).")
@click.option("--guard/--no-guard", default=True, show_default=True,
              help="Run with the Session's secret guard, as the game ships (--no-guard: measure the bare model).")
@click.option("--free", is_flag=True, help="Ask for the JSON in the prompt only (no constrained decoding), and "
              "parse what comes back: JSON validity then measures the model.")
@click.option("--max-tokens", default=96, show_default=True, type=click.IntRange(8), help="Tokens per answer.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--limit", default=None, type=click.IntRange(1), help="Play only the first N scenarios.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (summaries and every turn).")
@click.option("--plot", "plot_file", default=None, metavar="FILE",
              help="Also write a PNG comparing the models (needs matplotlib: pip install 'mlxq[plot]').")
def gm(scenarios: str, models: tuple[str, ...], variants: tuple[str, ...], guard: bool, free: bool, max_tokens: int,
       temperature: float, seed: int, limit: int | None, as_json: bool, plot_file: str | None) -> None:
    """The umigame game-master evaluation of each MODEL (and its quantized VARIANTS) on SCENARIOS.jsonl:
    answer accuracy, solve detection, hidden-story leaks, JSON validity, empty answers, Japanese quality,
    time to first token and tokens/s."""
    from rich.console import Console

    from mlxq.eval import gm as game

    console = Console(stderr=True)
    todo = game.load_scenarios(scenarios)[:limit]
    recipes = [_variant_recipe(v) for v in variants]
    if plot_file:
        from mlxq.eval.report import plot_target

        plot_target(plot_file)  # a missing matplotlib or directory fails before anything runs
    options = dict(guard=guard, free=free, max_tokens=max_tokens, temperature=temperature, seed=seed)
    summaries = []
    for name in models:
        summaries.append(_play_all(name, name, todo, console, **options))
        summaries += [_play_quantized(name, recipe, todo, console, **options) for recipe in recipes]
    result = [asdict(s) for s in summaries]
    if plot_file:
        game.plot(result, plot_file)
    if as_json:
        click.echo(json.dumps({"scenarios": scenarios, "guard": guard, "free": free, "models": result},
                              ensure_ascii=False))
        return
    game.show(result, Console(width=max(Console().width, 150)))
    if plot_file:
        click.echo(f"plot: {plot_file}")


def _variant_recipe(spec: str):
    from mlxq.errors import InvalidRequest
    from mlxq.quant.recipes import RECIPES, make_recipe

    if spec in RECIPES:
        return make_recipe(spec)
    bits = spec.removesuffix("bit")
    if bits.isdigit():
        return make_recipe(bits=int(bits))
    raise InvalidRequest(f"--quant {spec}: expected a recipe ({', '.join(RECIPES)}) or a number of bits")


def _play_all(name: str, label: str, scenarios: list, console, **options):
    """Loads `name` and plays every scenario, with progress; the summary is labelled `label`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    import mlxq
    from mlxq.eval import gm as game

    with console.status(f"loading {name}"):
        model = mlxq.load(name)
    last_turn = {s.id: len(s.turns) - 1 for s in scenarios}
    done = []

    def on_turn(r) -> None:
        bar.advance(task)
        if r.turn == last_turn[r.scenario] and not console.is_terminal:  # no live bar: a line per scenario
            done.append(r.scenario)
            console.print(f"{label}: {len(done)}/{len(scenarios)} scenarios played", highlight=False)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("turns"),
                  console=console, transient=True) as bar:
        task = bar.add_task(label, total=sum(len(s.turns) for s in scenarios))
        return game.evaluate(model, scenarios, label, on_turn=on_turn, **options)


def _play_quantized(name: str, recipe, scenarios: list, console, **options):
    """Quantizes `name` with `recipe` into a temporary directory, plays the scenarios on it, removes it."""
    import shutil
    import tempfile
    from pathlib import Path

    from mlxq.quant.pipeline import quantize

    tmp = Path(tempfile.mkdtemp(prefix="mlxq-gm-"))
    try:
        quantize(name, tmp / "model", recipe, console=console)
        return _play_all(str(tmp / "model"), f"{name}+{recipe.name}", scenarios, console, **options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
