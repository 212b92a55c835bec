"""`mlxq inspect --diff A B [--ref R]`: two or three models on the same tokens, compared layer by layer.

Every model is walked through the model contract (`embed`, the decoder `layers`, the final `norm`, `head`), so
one piece of code serves every family. Inside each layer the token mixer (`self_attn`: attention, `linear_attn`:
Gated DeltaNet) and the `mlp` (SwiGLU, GeGLU or MoE) are tapped for their outputs.

Per layer and model: the residual stream's RMS going in and out, its mean and max |x|, its RMS growth over
layer 0's, the mixer's and the MLP's output statistics; against the reference (R, else A): cosine and relative
error of the layer output, and the rank the reference's next token gets when this layer's output goes through
the final norm and the head (a logit lens; the last layer's row is the model's real output). An error jump is
the increase of relative error over the previous layer: the largest is named, and the first layer whose
increase is at least half the largest. Each model then decodes greedily from the tokens, and the first token
where A and B part is reported.

Models load as for `mlxq eval` (float32, quantized weights dequantized: the quantized model's activations up
to float rounding), one at a time; only the reference's hidden states are kept while the others run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxq.errors import InvalidRequest

MIXERS = {"self_attn": "attention", "linear_attn": "deltanet"}  # a layer's child -> what kind of mixer it is
MLP = "mlp"
JUMP_SHARE = 0.5  # the first jump: the first layer whose error increase is at least this share of the largest
GEN_TOKENS = 16


@dataclass
class LayerStats:
    layer: int  # -1: the embedding output
    kind: str  # embed | attention | deltanet
    in_rms: float
    out_rms: float
    mean: float
    max_abs: float
    growth: float = 1.0  # out_rms / layer 0's out_rms
    mixer_rms: float | None = None
    mixer_mean: float | None = None
    mixer_max: float | None = None
    mlp_rms: float | None = None
    mlp_mean: float | None = None
    mlp_max: float | None = None
    cos: float = 1.0  # mean over tokens of the cosine with the reference's layer output
    rel_err: float = 0.0  # mean over tokens of |x - ref| / |ref|
    jump: float = 0.0  # rel_err minus the previous row's
    rank: int = 1  # rank of the reference's next token through norm + head (1 = top)


# ---------------------------------------------------------------------------------------------- hooks
class _Tap(nn.Module):
    """Stands in for a child module during one layer call, handing its output to `record`."""

    def __init__(self, inner: nn.Module, record: Callable[[mx.array], None]):
        super().__init__()
        self.inner = inner
        self._record = record

    def __call__(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        self._record(y)
        return y


@contextmanager
def _tapped(layer: nn.Module) -> Iterator[dict[str, mx.array]]:
    """Within the block, calling `layer` fills the yielded dict with its mixer's and MLP's outputs."""
    seen: dict[str, mx.array] = {}
    names = [n for n in (*MIXERS, MLP) if n in layer]
    for n in names:
        layer[n] = _Tap(layer[n], lambda y, n=n: seen.__setitem__(n, y))
    try:
        yield seen
    finally:
        for n in names:
            layer[n] = layer[n].inner


def walk(net: nn.Module, tokens: list[int]) -> Iterator[tuple[str, mx.array, mx.array, dict[str, mx.array]]]:
    """(kind, layer input, layer output, tapped child outputs) for the embedding, then for every layer."""
    x = net.embed(mx.array(tokens)[None])
    yield "embed", x, x, {}
    for layer, cache in zip(net.model.layers, net.make_cache(), strict=True):
        with _tapped(layer) as seen:
            y = layer(x, cache)
            mx.eval(y, *seen.values())
        yield next((MIXERS[n] for n in MIXERS if n in seen), "layer"), x, y, seen
        x = y


def lens_logits(net: nn.Module, hidden: mx.array) -> mx.array:
    """Logits of residual-stream rows [N, D] put through the final norm and the head: [N, V]."""
    return net.head(net.model.norm(hidden)).astype(mx.float32)


# ---------------------------------------------------------------------------------------------- statistics
def _moments(x: mx.array) -> tuple[float, float, float]:
    x = x.astype(mx.float32)
    rms, mean, top = mx.sqrt(mx.mean(x * x)), mx.mean(x), mx.max(mx.abs(x))
    return rms.item(), mean.item(), top.item()


def _closeness(x: mx.array, ref: mx.array) -> tuple[float, float]:
    """(cosine, relative error) of x [T, D] against ref [T, D], each per token, averaged over tokens: a few tokens
    with massive activations (the first token's residual reaches hundreds in many models) would otherwise
    stand for all of them."""
    ref_norm = mx.sqrt((ref * ref).sum(-1))
    norms = mx.sqrt((x * x).sum(-1)) * ref_norm
    cos = mx.mean(mx.where(norms > 0, (x * ref).sum(-1) / mx.maximum(norms, 1e-30), 1.0))
    diff = mx.sqrt(((x - ref) ** 2).sum(-1))
    err = mx.mean(mx.where(ref_norm > 0, diff / mx.maximum(ref_norm, 1e-30), diff))
    return cos.item(), err.item()


def jumps(errors: list[float]) -> tuple[int | None, float, int | None]:
    """(largest-jump layer, its increase, first-jump layer) from per-row errors, row 0 being the embedding.
    None when the error never increases."""
    deltas = [errors[i] - errors[i - 1] for i in range(1, len(errors))]
    if not deltas or max(deltas) <= 0:
        return None, 0.0, None
    top = max(deltas)
    largest = deltas.index(top)
    first = next(i for i, d in enumerate(deltas) if d >= JUMP_SHARE * top)
    return largest, top, first


def profile(net: nn.Module, tokens: list[int], ref: list[mx.array] | None = None, target: int | None = None,
            keep: bool = False, progress: Callable[[], None] | None = None) -> tuple[list[LayerStats], list, int]:
    """Per-row statistics of `net` on `tokens` against the reference hidden states `ref` (none: `net` is the
    reference); ranks are of `target` (none: this model's own next token). Returns (rows, the hidden states
    [T, D] per row when `keep`, the target)."""
    rows: list[LayerStats] = []
    kept, last = [], []
    for i, (kind, x_in, x_out, seen) in enumerate(walk(net, tokens)):
        h = x_out[0].astype(mx.float32)
        row = LayerStats(i - 1, kind, _moments(x_in)[0], *_moments(h))
        mixer = next((seen[n] for n in MIXERS if n in seen), None)
        if mixer is not None:
            row.mixer_rms, row.mixer_mean, row.mixer_max = _moments(mixer)
        if MLP in seen:
            row.mlp_rms, row.mlp_mean, row.mlp_max = _moments(seen[MLP])
        if ref is not None:
            if ref[i].shape != h.shape:
                raise InvalidRequest(f"layer {i - 1}: hidden states {tuple(h.shape)} vs the reference's "
                                     f"{tuple(ref[i].shape)}: --diff needs models of one architecture")
            row.cos, row.rel_err = _closeness(h, ref[i])
        if keep:
            kept.append(h)
        last.append(h[-1])
        rows.append(row)
        if progress is not None:
            progress()
    logits = lens_logits(net, mx.stack(last))
    if target is None:
        target = int(mx.argmax(logits[-1]).item())
    if target >= logits.shape[-1]:
        raise InvalidRequest(f"the reference's next token {target} is outside this model's vocabulary "
                             f"({logits.shape[-1]}): --diff needs models with one vocabulary")
    ranks = 1 + (logits > logits[:, target : target + 1]).sum(-1)
    base = rows[1].out_rms if len(rows) > 1 and rows[1].out_rms else 1.0
    for row, rank in zip(rows, ranks.tolist(), strict=True):
        row.rank, row.growth = rank, row.out_rms / base
    for prev, row in zip(rows, rows[1:], strict=False):
        row.jump = row.rel_err - prev.rel_err
    return rows, kept, target


def divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first generated token where a and b differ (one ending earlier counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------- the run
def read_tokens(path: str) -> list[int]:
    """Token ids from a file: a JSON list, or integers separated by whitespace or commas."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{p}: cannot read token file ({e.__class__.__name__})") from None
    try:
        ids = json.loads(text) if text.lstrip().startswith("[") else [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise InvalidRequest(f"{p}: expected token ids (a JSON list or integers separated by spaces)") from None
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise InvalidRequest(f"{p}: expected a non-empty list of non-negative integer token ids")
    return ids


def run(a: str, b: str, ref: str | None = None, prompt: str | None = None, tokens: list[int] | None = None,
        gen_tokens: int = GEN_TOKENS, console=None) -> dict:
    """The comparison as a JSON-able dict (what `--json` prints and the table and plot are drawn from)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mlxq.eval.metrics import load_for_eval

    if (prompt is None) == (tokens is None):
        raise InvalidRequest("give either --prompt TEXT or --tokens FILE")
    order = [("ref", ref), ("A", a), ("B", b)] if ref else [("A", a), ("B", b)]
    console = console or Console(stderr=True)
    report: dict = {"reference": order[0][0], "prompt": prompt, "models": {}}
    ref_hidden: list[mx.array] | None = None
    target = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:
        for label, name in order:
            task = bar.add_task(f"{label}: loading {name}", total=None)
            m = load_for_eval(name)
            if tokens is None:
                tokens = m.tokenizer.encode(prompt)
                if not tokens:
                    raise InvalidRequest("--prompt gives no tokens")
            vocab = m.net.model.embed_tokens.weight.shape[0]
            if max(tokens) >= vocab:
                raise InvalidRequest(f"token id {max(tokens)} is outside {name}'s vocabulary ({vocab})")
            n_layers = len(m.net.model.layers)
            if ref_hidden is not None and len(ref_hidden) != n_layers + 1:
                raise InvalidRequest(f"{name} has {n_layers} layers, the reference {len(ref_hidden) - 1}: --diff "
                                     "needs models of one architecture")
            bar.update(task, description=f"{label}: {name}", total=n_layers + 1 + gen_tokens, completed=0)
            rows, kept, target = profile(m.net, tokens, ref_hidden, target, keep=ref_hidden is None,
                                         progress=lambda task=task: bar.advance(task))
            if ref_hidden is None:
                ref_hidden = kept
            gen = m.generate(list(tokens), max_tokens=gen_tokens).tokens if gen_tokens else []
            bar.update(task, completed=n_layers + 1 + gen_tokens)
            largest, top, first = jumps([r.rel_err for r in rows])
            report["models"][label] = {
                "name": name,
                "layers": [asdict(r) for r in rows],
                "largest_jump": {"layer": largest, "increase": top},
                "first_jump": first,
                "next_token": target,
                "next_token_rank": rows[-1].rank,
                "generated": gen,
                "generated_text": m.tokenizer.decode(gen),
                "pieces": [m.tokenizer.decode([t]) for t in gen],
            }
            del m
            mx.clear_cache()
    report["tokens"] = tokens
    models = report["models"]
    k = divergence(models["A"]["generated"], models["B"]["generated"])
    report["divergence"] = {"index": k, **{x: (models[x]["pieces"][k] if k is not None and k < len(models[x]["pieces"])
                                                else None) for x in ("A", "B")}}
    return report


# ---------------------------------------------------------------------------------------------- output
def _f(x: float | None, spec: str = ".3g") -> str:
    return "" if x is None else format(x, spec)


def show(report: dict, console) -> None:
    """One rich table per model, then the jumps and the divergence."""
    from rich.table import Table

    ref = report["reference"]
    for label, m in report["models"].items():
        is_ref = label == ref
        mark = {m["largest_jump"]["layer"]: "largest jump", m["first_jump"]: "first jump"}
        if m["largest_jump"]["layer"] == m["first_jump"]:
            mark = {m["first_jump"]: "first and largest jump"}
        title = f"{label}: {m['name']}" + (" (reference)" if is_ref else f" vs {ref}")
        table = Table(title=title, title_justify="left")
        cols = ["layer", "kind", "in RMS", "out RMS", "growth", "mean", "max|x|", "mix RMS", "MLP RMS", "MLP mean",
                "MLP max"]
        cols += [] if is_ref else ["cos", "rel err", "jump"]
        for c in [*cols, "rank"]:
            table.add_column(c, justify="left" if c in ("layer", "kind") else "right", no_wrap=c == "kind")
        for r in m["layers"]:
            cells = ["emb" if r["layer"] < 0 else str(r["layer"]), r["kind"], _f(r["in_rms"]), _f(r["out_rms"]),
                     _f(r["growth"], ".1f") + "x", _f(r["mean"], "+.3g"), _f(r["max_abs"]), _f(r["mixer_rms"]),
                     _f(r["mlp_rms"]), _f(r["mlp_mean"], "+.3g"), _f(r["mlp_max"])]
            if not is_ref:
                cells += [_f(r["cos"], ".5f"), _f(r["rel_err"]), _f(r["jump"], "+.3g")]
            note = mark.get(r["layer"]) if r["layer"] >= 0 and not is_ref else None
            table.add_row(*cells, str(r["rank"]), style="bold red" if note else None)
        console.print(table)
        if not is_ref:
            lj = m["largest_jump"]
            what = (f"largest error jump at layer {lj['layer']} (+{lj['increase']:.4g}), first jump at layer "
                    f"{m['first_jump']}" if lj["layer"] is not None else "no error at any layer")
            console.print(f"{label} vs {ref}: {what}; the reference's next token ranks {m['next_token_rank']}")
    d = report["divergence"]
    n = len(report["models"]["A"]["generated"])
    if d["index"] is None:
        console.print(f"generation: A and B agree on all {n} greedy tokens")
    else:
        console.print(f"generation: A and B agree on {d['index']} tokens, then part: A {d['A']!r} vs B {d['B']!r}")


def plot(report: dict, path: str) -> Path:
    """Six panels over the layers: RMS growth, mean, MLP mean, relative error, cosine, rank of the next token."""
    from mlxq.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    panels = [("out_rms", "output RMS", True), ("mean", "output mean", False), ("mlp_mean", "MLP output mean", False),
              ("rel_err", "relative error vs reference", True), ("cos", "cosine vs reference", False),
              ("rank", "rank of reference's next token", True)]
    for ax, (key, title, log) in zip(axes.flat, panels, strict=True):
        for label, m in report["models"].items():
            rows = [r for r in m["layers"] if r[key] is not None and (key != "rel_err" or r["rel_err"] > 0)]
            ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker=".",
                    label=f"{label}: {Path(m['name']).name}")
            lj = m["largest_jump"]["layer"]
            if key == "rel_err" and lj is not None:
                ax.axvline(lj, linestyle=":", color=ax.lines[-1].get_color())
        ax.set_title(title)
        ax.set_xlabel("layer (-1: embedding)")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"mlxq inspect --diff on {len(report['tokens'])} tokens (reference: {report['reference']})")
    return save_figure(fig, path)
