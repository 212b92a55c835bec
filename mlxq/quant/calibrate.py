"""Calibration: run text through the float model and record, for the input of every linear layer and expert,
the mean squared activation per input channel (the importance matrix, as llama.cpp's imatrix) and, for
GPTQ, the mean outer product E[x x^T] (the layer's Hessian up to a constant).

Layers that read the same input share one record (q/k/v, gate/up, the DeltaNet input projections); experts
get one row per expert, counting only the tokens routed to them. The output head's input is the final norm's
output, recorded there, so tied embeddings get the head's statistics.

The model runs layer by layer (`collect`): every calibration sequence goes through decoder layer i before
layer i+1 is read from the source, so one layer's weights are in memory at a time, however big the model.
Statistics are written out as each layer finishes and Hessians are read back one site at a time, so neither
pile up either. Routed experts get the importance matrix only: one Hessian per expert costs experts x in^2
(34 GB a layer for Qwen3.5-397B) and would rest on the few tokens routed to that expert.

Records are cached under the cache dir, in a folder named by the source's fingerprint (paths, sizes and
mtimes of its files), keyed by the text, the token budget and whether Hessians were kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxq.errors import InvalidRequest
from mlxq.formats.base import Checkpoint
from mlxq.formats.fetch import cache_dir
from mlxq.loading import check_weights
from mlxq.models import build_model, text_config
from mlxq.quant.source import module_path

# Projections that read the same input as another one: their statistics are recorded once, on the leader.
LEADER: dict[str, str] = {
    "k_proj": "q_proj",
    "v_proj": "q_proj",
    "up_proj": "gate_proj",
    "in_proj_z": "in_proj_qkv",
    "in_proj_a": "in_proj_qkv",
    "in_proj_b": "in_proj_qkv",
    "in_proj_qkvz": "in_proj_qkv",
    "in_proj_ba": "in_proj_qkv",
    "gate_up_proj": "gate_proj",
}
HEAD_SITE = "lm_head"  # the output head's input (final norm output)
FLOOR = 1e-2  # importance added to every channel, as a fraction of the mean
SEQ_LEN = 512
DEFAULT_TOKENS = 32768


@dataclass
class Stats:
    """Per-site statistics: `diag` [in] or [experts, in] = E[x^2]; Hessians E[x x^T] [in, in] (only when
    collected for GPTQ, never for experts) stay on disk, in `hessian_files`, until `hessian(site)` reads one."""

    diag: dict[str, mx.array] = field(default_factory=dict)
    hessian_files: dict[str, Path] = field(default_factory=dict)  # site -> safetensors file holding it
    tokens: int = 0
    # MoE block path -> [experts, experts] tokens routed to both (diagonal: to each), for `--order coactivation`
    coactivation: dict[str, mx.array] = field(default_factory=dict)

    def hessian(self, site: str) -> mx.array | None:
        # read afresh each time: an evaluated Hessian is dropped with its caller's reference
        return mx.load(str(self.hessian_files[site]))[site] if site in self.hessian_files else None

    def lookup(self, name: str, tied: bool = False) -> tuple[mx.array | None, mx.array | None]:
        """(importance, hessian) for source tensor `name`, shaped to broadcast against its weight: [in] for a
        linear, [experts, 1, in] / [experts, in, in] for stacked experts, one expert's row for a per-expert
        tensor. (None, None) when the tensor's input was never seen (e.g. MTP, an untied input embedding)."""
        site, expert = site_of(name, tied)
        if site is None or site not in self.diag:
            return None, None
        d, h = self.diag[site], self.hessian(site)
        d = d + FLOOR * d.mean(axis=-1, keepdims=True)  # a silent channel still counts a little
        if d.ndim == 2:  # experts
            return (d[expert] if expert is not None else d[:, None, :]), None
        return d, h


_EXPERT = re.compile(r"\.experts\.(\d+)\.(\w+)$")


def site_of(name: str, tied: bool = False) -> tuple[str | None, int | None]:
    """Source tensor name -> (site whose input it reads, expert index for per-expert tensors)."""
    base = name.removesuffix(".weight")
    if base.endswith("lm_head") or (tied and base.endswith("embed_tokens")):
        return HEAD_SITE, None
    if base.endswith("embed_tokens"):
        return None, None
    expert = None
    if m := _EXPERT.search(base):
        expert = int(m.group(1))
        base = base[: m.start()] + ".experts." + m.group(2)
    path = module_path(base)
    parent, _, leaf = path.rpartition(".")
    return f"{parent}.{LEADER.get(leaf, leaf)}" if parent else path, expert


# ---------------------------------------------------------------------------------------------- recording
class _Accumulator:
    def __init__(self, dim: int, experts: int, hessian: bool):
        shape = (experts, dim) if experts else (dim,)
        self.experts, self.dim = experts, dim
        self.sum_sq = mx.zeros(shape)
        self.count = mx.zeros((experts,) if experts else ())
        self.outer = mx.zeros((dim, dim)) if hessian and not experts else None

    def add(self, x: mx.array, experts: mx.array | None = None) -> None:
        x = x.astype(mx.float32).reshape(-1, self.dim)
        if not self.experts:
            self.sum_sq = self.sum_sq + (x * x).sum(axis=0)
            self.count = self.count + x.shape[0]
            if self.outer is not None:
                self.outer = self.outer + x.T @ x
        else:
            e = experts.reshape(-1)
            if x.shape[0] != e.size:  # one row per token, k experts each: one row per (token, expert) pair
                x = mx.broadcast_to(x[:, None], (x.shape[0], e.size // x.shape[0], self.dim)).reshape(-1, self.dim)
            onehot = (e[:, None] == mx.arange(self.experts)[None]).astype(mx.float32)  # [pairs, experts]
            self.sum_sq = self.sum_sq + onehot.T @ (x * x)
            self.count = self.count + onehot.sum(axis=0)
        mx.eval(self.sum_sq, self.count, *([self.outer] if self.outer is not None else []))

    def result(self) -> tuple[mx.array, mx.array | None]:
        n = mx.maximum(self.count, 1)
        diag = self.sum_sq / (n[:, None] if self.experts else n)
        outer = None if self.outer is None else self.outer / n
        return diag, outer


class _Recorder(nn.Module):
    """Wraps a layer: records its input (or, for the final norm, its output), then runs it unchanged."""

    def __init__(self, inner: nn.Module, acc: _Accumulator, output: bool = False):
        super().__init__()
        self.inner = inner
        self._acc, self._output = acc, output

    def __getattr__(self, key: str):
        # callers may read the wrapped layer's attributes (e.g. a MoE block asking its experts' count)
        try:
            return super().__getattr__(key)
        except AttributeError:
            inner = self.get("inner")
            if inner is None:
                raise
            return getattr(inner, key)

    def expert(self, x: mx.array, e: int) -> mx.array:
        """One expert's tokens at once (the CPU MoE path): recorded for that expert alone."""
        self._acc.add(x, mx.full((x.shape[0],), e))
        return self["inner"].expert(x, e)

    def __call__(self, x: mx.array, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        if self._output:
            self._acc.add(y)
        else:
            self._acc.add(x, args[0] if args else None)
        return y


class _Coactivation:
    """Counts, per pair of experts of one MoE block, the tokens routed to both (its input: the top-k ids)."""

    def __init__(self, n_experts: int):
        self.counts = mx.zeros((n_experts, n_experts))

    def add(self, x: mx.array, experts: mx.array) -> None:
        n = self.counts.shape[0]
        chosen = (experts.reshape(-1, experts.shape[-1])[..., None] == mx.arange(n)).any(axis=1).astype(mx.float32)
        self.counts = self.counts + chosen.T @ chosen
        mx.eval(self.counts)


def attach_routing(root: nn.Module, prefix: str = "") -> dict[str, _Coactivation]:
    """Wrap every MoE block's experts under `root` with a co-activation counter; block path -> counter."""
    from mlxq.models.moe import SparseMoE

    counters = {}
    for path, module in [(p, m) for p, m in root.named_modules() if isinstance(m, SparseMoE)]:
        counters[prefix + path] = acc = _Coactivation(module.experts.gate_proj.num_experts)
        module.experts = _Recorder(module.experts, acc)
    return counters


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    obj = model
    *parts, leaf = path.split(".")
    for p in parts:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    return obj, leaf


def attach(root: nn.Module, hessian: bool, prefix: str = "") -> dict[str, _Accumulator]:
    """Wrap every linear/expert leader under `root` (and, for a whole model, the final norm) with recorders;
    returns site -> accumulator, sites named by their path in the model (`prefix` + path under `root`)."""
    from mlxq.models.moe import SwitchLinear

    accs: dict[str, _Accumulator] = {}
    targets = []
    for path, module in root.named_modules():
        leaf = path.rpartition(".")[2]
        if isinstance(module, nn.Linear | SwitchLinear) and leaf not in LEADER and prefix + path != "lm_head":
            targets.append((path, module))
    for path, module in targets:
        # `weight_t` is the [.., in, out] layout some layers switch to for CPU speed
        w = module["weight_t"].swapaxes(-1, -2) if "weight_t" in module else module["weight"]
        acc = accs[prefix + path] = _Accumulator(w.shape[-1], w.shape[0] if w.ndim == 3 else 0, hessian)
        parent, leaf = _parent(root, path)
        parent[leaf] = _Recorder(module, acc)
    norm = dict(root.named_modules()).get("model.norm")
    if norm is not None:
        accs[HEAD_SITE] = _Accumulator(norm["weight"].shape[0], 0, hessian)
        parent, leaf = _parent(root, "model.norm")
        parent[leaf] = _Recorder(norm, accs[HEAD_SITE], output=True)
    return accs


def token_batches(tokenizer, texts: dict[str, str], n_tokens: int, seq_len: int) -> list[list[int]]:
    """Sequences of `seq_len` tokens, taken in turn from each text so that the mix stays balanced."""
    streams = {k: tokenizer.encode(t, add_special_tokens=False) for k, t in texts.items()}
    cursors = dict.fromkeys(streams, 0)
    out: list[list[int]] = []
    while len(out) * seq_len < n_tokens:
        progressed = False
        for k, ids in streams.items():
            if cursors[k] + seq_len <= len(ids) and len(out) * seq_len < n_tokens:
                out.append(ids[cursors[k] : cursors[k] + seq_len])
                cursors[k] += seq_len
                progressed = True
        if not progressed:
            break
    if not out:
        raise InvalidRequest(f"calibration text is shorter than one sequence of {seq_len} tokens")
    return out


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class _LayerSource:
    """The model's weights one decoder layer at a time. The model's own `sanitize` sees every name each time
    (renames and layout checks may look across layers), but only the wanted layer's tensors are read from
    the source; the others are lazy zeros of their shape that are never evaluated."""

    def __init__(self, ckpt: Checkpoint, model: nn.Module):
        self.ckpt, self.model = ckpt, model
        self.expected = dict(tree_flatten(model.parameters()))
        self.groups: dict[int | None, list[str]] = {}
        for name in ckpt.tensors:
            self.groups.setdefault(_layer_of(name), []).append(name)

    def bind(self, layer: int | None) -> None:
        """Load layer `layer`'s weights (None: those outside the layers) into the model, as float32."""
        wanted = set(self.groups.get(layer, ()))
        tensors = self.ckpt.tensors
        sources = {n: tensors[n] if n in wanted else mx.zeros(tensors.info(n).shape) for n in tensors}
        weights = {k: v for k, v in self.model.sanitize(sources).items() if _layer_of(k) == layer}
        check_weights(self.ckpt.path, {k: v for k, v in self.expected.items() if _layer_of(k) == layer}, weights)
        weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
        self.model.load_weights(list(weights.items()), strict=False)


def collect(ckpt: Checkpoint, batches: list[list[int]], hessian: bool, out: Path, progress=None) -> Stats:
    """Run the calibration sequences through the model layer by layer, recording every site's statistics;
    each layer's Hessians are written into directory `out` as soon as the layer is done."""
    model = build_model(text_config(ckpt.config))
    model.eval()
    source = _LayerSource(ckpt, model)
    layers = model.layers
    caches = [model.make_cache() for _ in batches]  # made while every layer is still there to say its kind
    source.bind(None)
    hidden = [model.embed(mx.array(seq)[None]) for seq in batches]
    mx.eval(hidden)
    model.model.embed_tokens = None  # the head's input is what is recorded: neither matrix is needed again
    if "lm_head" in model:
        model.lm_head = None
    stats = Stats(tokens=sum(len(b) for b in batches))
    out.mkdir(parents=True)

    def keep(accs: dict[str, _Accumulator], file: str) -> None:
        hessians = {}
        for site, acc in accs.items():
            stats.diag[site], outer = acc.result()
            if outer is not None:
                hessians[site] = outer
        if hessians:
            mx.save_safetensors(str(out / file), hessians)
            stats.hessian_files.update(dict.fromkeys(hessians, out / file))

    for i in range(len(layers)):
        source.bind(i)
        mx.eval(layers[i].parameters())
        accs = attach(layers[i], hessian, prefix=f"model.layers.{i}.")
        routing = attach_routing(layers[i], prefix=f"model.layers.{i}.")
        for b, seq in enumerate(batches):
            hidden[b] = layers[i](hidden[b], caches[b][i])
            caches[b][i] = None
            mx.eval(hidden[b])
            if progress is not None:
                progress(len(seq), i)
        keep(accs, f"hessian-{i:05d}.safetensors")
        stats.coactivation.update({block: acc.counts for block, acc in routing.items()})
        layers[i] = None  # this layer's weights and recorders go
        mx.clear_cache()
    head = _Accumulator(hidden[0].shape[-1], 0, hessian)
    for h in hidden:
        head.add(model.norm(h))
    keep({HEAD_SITE: head}, "hessian-head.safetensors")
    mx.save_safetensors(str(out / "diag.safetensors"), stats.diag, metadata={"tokens": str(stats.tokens)})
    mx.save_safetensors(str(out / "coactivation.safetensors"), stats.coactivation)
    return stats


# ---------------------------------------------------------------------------------------------- cache
def fingerprint(ckpt: Checkpoint) -> str:
    """Identity of a source on disk: resolved paths, sizes and mtimes of its weights and config."""
    root = Path(ckpt.path).resolve()
    files = (
        [root]
        if root.is_file()
        else sorted(
            p
            for p in root.iterdir()
            if p.is_file() and (p.suffix in (".safetensors", ".gguf") or p.name == "config.json")
        )
    )
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cache_path(ckpt: Checkpoint, text_key: str, n_tokens: int, seq_len: int, hessian: bool) -> Path:
    """The directory of one set of statistics: diag.safetensors and, with Hessians, one file a layer."""
    name = f"{text_key}-{n_tokens}x{seq_len}{'-hessian' if hessian else ''}"
    return cache_dir() / "imatrix" / fingerprint(ckpt) / name


def load(path: Path) -> Stats | None:
    try:
        diag, meta = mx.load(str(path / "diag.safetensors"), return_metadata=True)
        stats = Stats(diag=dict(diag), tokens=int(meta.get("tokens", 0)))
        if (path / "coactivation.safetensors").exists():  # (statistics cached before it was recorded lack it)
            stats.coactivation = dict(mx.load(str(path / "coactivation.safetensors")))
        for f in sorted(path.glob("hessian-*.safetensors")):
            stats.hessian_files.update(dict.fromkeys(mx.load(str(f)), f))
    except (OSError, RuntimeError, ValueError):
        return None
    return stats


def text_key(text: str | None) -> tuple[str, dict[str, str]]:
    """The calibration texts for `--calibrate [FILE]` and a short key naming them in the cache."""
    from mlxq.formats.texts import DEFAULT_CALIBRATION, calibration_texts, read_text_file

    if not text or text == DEFAULT_CALIBRATION:
        return DEFAULT_CALIBRATION, calibration_texts()
    body = read_text_file(text)
    return "text-" + hashlib.sha256(body.encode()).hexdigest()[:12], {"file": body}


def calibration_stats(
    ckpt_opener, text: str | None, hessian: bool, n_tokens: int = DEFAULT_TOKENS, seq_len: int = SEQ_LEN, console=None,
    coactivation: bool = False,
) -> Stats:
    """Statistics for a source, from the cache when present. `ckpt_opener()` opens a fresh float view of the
    source (the model is loaded from it only when the cache misses). `coactivation`: the expert co-activation
    counts are needed (a cached entry from before they were recorded is a miss)."""
    from mlxq.engine.tokenizer import load_tokenizer

    ckpt = ckpt_opener()
    key, texts = text_key(text)
    for want in [True] if hessian else [False, True]:  # statistics with Hessians also serve a diag-only run
        path = cache_path(ckpt, key, n_tokens, seq_len, want)
        cached = load(path) if path.exists() else None
        if cached is not None and coactivation and not (cached.coactivation or _has_no_experts(cached)):
            cached = None
        if cached is not None:
            _say(console, f"calibration: cached statistics ({cached.tokens} tokens of {key})")
            return cached
    tok = load_tokenizer(ckpt.tokenizer_dir, ckpt.gguf_file, ckpt.chat_template)
    batches = token_batches(tok, texts, n_tokens, seq_len)
    layers = text_config(ckpt.config).get("num_hidden_layers", 1)
    path = cache_path(ckpt, key, n_tokens, seq_len, hessian)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("calibrating"),
        BarColumn(),
        TextColumn("layer {task.fields[layer]}/" + str(layers)),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("calibrate", total=sum(len(b) for b in batches) * layers, layer=0)
        try:
            stats = collect(ckpt, batches, hessian, tmp, lambda n, i: bar.update(task, advance=n, layer=i + 1))
            (tmp / "source.json").write_text(
                json.dumps(
                    {"source": str(ckpt.path), "text": key, "tokens": stats.tokens, "seq_len": seq_len,
                     "hessian": hessian},
                    indent=1,
                )
                + "\n"
            )
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)  # the statistics appear whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(console, f"calibration: {stats.tokens} tokens of {key}; statistics cached in {path}")
    return load(path)


def _has_no_experts(stats: Stats) -> bool:
    return all(d.ndim == 1 for d in stats.diag.values())


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(f"mlxq: {msg}", highlight=False, soft_wrap=True)
    else:
        print(f"mlxq: {msg}", file=sys.stderr)
