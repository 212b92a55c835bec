"""`mlxq eval ppl MODEL` and `mlxq eval kl MODEL --ref SRC`: quality of a (quantized) model on a text."""

from __future__ import annotations

import json

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
    """Perplexity and KL divergence of a model on a text."""


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
