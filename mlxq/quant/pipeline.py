"""The streaming quantizer: source checkpoint -> mlx-lm compatible directory, one tensor at a time.

Plan first (from tensor names, shapes and the recipe: no weight is read), then stream: read one tensor,
quantize it, write it into its shard, drop it. Peak memory is the largest tensor plus the quantizer's working
set on one row chunk. The output is built in a hidden temporary directory next to OUT and renamed into place
only when complete; an interrupted run removes it (a killed one leaves it hidden, and the next run clears it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxq.errors import InvalidRequest
from mlxq.formats import open_checkpoint
from mlxq.formats.base import Checkpoint
from mlxq.kernels import ternary
from mlxq.models import text_config
from mlxq.quant import affine
from mlxq.quant.calibrate import DEFAULT_TOKENS, Stats, calibration_stats
from mlxq.quant.gptq import gptq
from mlxq.quant.recipes import FLOAT, Recipe, Spec, Where
from mlxq.quant.roles import in_mtp, layer_of, role_of
from mlxq.quant.source import float_checkpoint, lossy_warning, module_path, quantized_as
from mlxq.quant.writer import DEFAULT_SHARD_BYTES, OutTensor, ShardWriter

METHODS = ("auto", "rtn", "search", "gptq")
# What `auto` picks. Measured on SmolLM2-135M, 3-bit g64, 2048 held-back wiki tokens, 8192 calibration tokens
# (bench/quant_quality.py has the rest): mean KL vs the float model: RTN 2.22, importance-weighted clip search
# 0.79, GPTQ 0.75 (q2_k mix: search 1.64, GPTQ 1.47). Without calibration, the clip search minimising plain
# weight error is worse than RTN (2.66: it clips outliers that matter), so RTN is the uncalibrated default.
AUTO_CALIBRATED, AUTO_PLAIN = "gptq", "rtn"

# Source dtype names (TensorInfo.dtype, lower-cased: safetensors dtypes as mlxq names them, GGUF float type names)
# -> the array dtype the source hands out; GGUF block types load as float32.
_SOURCE_DTYPES: dict[str, mx.Dtype] = {
    name: getattr(mx, name)
    for name in ("float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32",
                 "uint64")
} | {"bool": mx.bool_, "f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
_KEEP_FLOAT32 = ("ssm_a", "ssm_dt")  # tiny, and exp()'d by the model: keep the source's float32
_FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")  # HF's 3-D expert tensors (no .weight)

_ternary_warned = False
TERNARY_PACKING = "tq2"  # 2 bits a weight: the faster decode of the two packings, GGUF TQ2_0's layout


@dataclass
class Item:
    """One source tensor and what becomes of it."""

    name: str
    role: str | None
    spec: Spec
    src_bytes: int
    outputs: list[OutTensor]
    parts: list[tuple[str, int, int]] = field(default_factory=list)  # quantized: (module base, row lo, row hi)
    cols: int = 0  # the weight's input dimension
    pack: bool = False  # a routed expert written into an expert pack instead of a shard (--stream-experts)


@dataclass
class Plan:
    items: list[Item]
    quantization: dict | None
    tied: bool
    unknown: list[str]

    @property
    def outputs(self) -> list[OutTensor]:
        """The tensors written into shards (everything but packed experts)."""
        return [t for item in self.items if not item.pack for t in item.outputs]


@dataclass
class Result:
    out: Path
    tensors: int
    quantized: int
    bytes_in: int
    bytes_out: int
    params: int
    bpw_quantized: float  # over quantized tensors: codes + fp16 scales and biases
    bpw: float  # whole model: every byte written over every parameter
    seconds: float
    method: str
    recipe: str


@dataclass(frozen=True)
class ModelShape:
    """What recipe rules look at besides a tensor's role, read from the config and the tensor names."""

    model_type: str | None
    n_layers: int
    gqa: int  # query heads per KV head
    experts: int  # routed experts per MoE layer (0: dense)
    tied: bool  # no separate output head: the embedding is the head

    @classmethod
    def of(cls, ckpt: Checkpoint) -> ModelShape:
        cfg = text_config(ckpt.config)
        heads = cfg.get("num_attention_heads") or 1
        names = [i.name for i in ckpt.tensors.infos()]
        return cls(cfg.get("model_type"), int(cfg.get("num_hidden_layers") or 1),
                   max(1, heads // (cfg.get("num_key_value_heads") or heads)),
                   int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
                   not any(n.endswith("lm_head.weight") and not in_mtp(n) for n in names))

    def spec(self, recipe: Recipe, name: str, role: str | None, shape: tuple[int, ...], dtype: str) -> Spec:
        """The recipe's spec for one tensor: float unless it is a weight matrix (or stacked experts)."""
        src_dtype = _SOURCE_DTYPES.get(dtype.lower(), mx.float32)  # GGUF block types load as float32
        weightlike = (len(shape) >= 2 and mx.issubdtype(src_dtype, mx.floating)
                      and (name.endswith(".weight") or _FUSED_EXPERTS.search(name)))
        if role is None or not weightlike:
            return FLOAT
        where = Where(layer_of(name), self.n_layers, self.gqa, in_mtp(name), self.experts)
        # a tied embedding is also the output head: it follows the head's rules (as llama.cpp does)
        if role == "embedding" and self.tied and not where.mtp:
            return recipe.spec("lm_head", where, alias="embedding")
        return recipe.spec(role, where)


def plan(ckpt: Checkpoint, recipe: Recipe, dtype: mx.Dtype | None = None, stream_experts: bool = False) -> Plan:
    """What each tensor becomes: its role, its spec and the tensors written for it. Reads no weights.
    `stream_experts`: routed experts go into expert packs (`mlxq.experts`) instead of shards."""
    shape_of = ModelShape.of(ckpt)
    items, unknown = [], []
    for info in ckpt.tensors.infos():
        name, shape = info.name, tuple(info.shape)
        role = role_of(name, shape_of.model_type)
        src_dtype = _SOURCE_DTYPES.get(info.dtype.lower(), mx.float32)
        is_float = mx.issubdtype(src_dtype, mx.floating)
        if role is None:
            unknown.append(name)
        spec = shape_of.spec(recipe, name, role, shape, info.dtype)
        if spec.quantized:
            spec = _fit_group(spec, shape[-1])
        if not spec.quantized:
            out_dtype = (
                src_dtype
                if not is_float
                else (
                    mx.float32
                    if role in _KEEP_FLOAT32 and src_dtype == mx.float32
                    else dtype or (mx.bfloat16 if src_dtype == mx.bfloat16 else mx.float16)
                )
            )
            items.append(Item(name, role, spec, info.nbytes, [OutTensor(name, shape, out_dtype)]))
            continue
        if m := _FUSED_EXPERTS.search(name):
            prefix = name[: m.start()] + ".switch_mlp."  # mlx-lm's name for stacked experts
            rows = shape[-2]
            parts = (
                [(prefix + "gate_proj", 0, rows // 2), (prefix + "up_proj", rows // 2, rows)]
                if m.group(1) == "gate_up_proj"
                else [(prefix + "down_proj", 0, rows)]
            )
        else:
            parts = [(name.removesuffix(".weight"), 0, shape[-2])]
        outputs = []
        for base, lo, hi in parts:
            lead = (*shape[:-2], hi - lo)
            if spec.precision == "ternary":
                outputs += [OutTensor(f"{base}.weight", (*lead, ternary.packed_width(shape[-1], TERNARY_PACKING)),
                                      mx.uint8), OutTensor(f"{base}.scales", lead, mx.float32)]
                continue
            groups = shape[-1] // spec.group_size
            outputs += [
                OutTensor(f"{base}.weight", (*lead, shape[-1] * spec.bits // 32), mx.uint32),
                OutTensor(f"{base}.scales", (*lead, groups), affine.PARAM_DTYPE),
                OutTensor(f"{base}.biases", (*lead, groups), affine.PARAM_DTYPE),
            ]
        items.append(Item(name, role, spec, info.nbytes, outputs, parts, shape[-1],
                          stream_experts and role.startswith("expert_")))
    if stream_experts:
        unpackable = [it for it in items if it.role and it.role.startswith("expert_")
                      and it.spec.precision in ("float", "ternary")]
        if unpackable:
            raise InvalidRequest(f"--stream-experts: expert tensor '{unpackable[0].name}' would be "
                                 f"{unpackable[0].spec.precision} (packs hold affine-quantized experts; pick a recipe "
                                 "that quantizes them to 2..8 bits)")
    return Plan(items, _quant_config([it for it in items if not it.pack], shape_of.model_type), shape_of.tied,
                unknown)


def _fit_group(spec: Spec, cols: int) -> Spec:
    """A group size that divides the input dimension (smaller ones first), or float when none does."""
    if not spec.quantized or spec.precision == "ternary" or cols % spec.group_size == 0:
        return spec
    for g in (64, 32):
        if g < spec.group_size and cols % g == 0:
            return Spec(spec.precision, g)
    return FLOAT


def _quant_config(items: list[Item], arch: str | None = None) -> dict | None:
    """mlx-lm's `quantization`: the most common affine (bits, group) as default, the others as per-module entries,
    keyed by the module path as the loaders name it (and as the checkpoint names it, when different). Ternary
    modules always get their own entry (mode "ternary"; BitNet's also its int8 activations)."""
    quantized = [(base, it.spec) for it in items if it.spec.quantized for base, _, _ in it.parts]
    modules = [(base, (s.bits, s.group_size)) for base, s in quantized if s.precision != "ternary"]
    if not quantized:
        return None
    config: dict = {"group_size": 64, "bits": 2, "mode": "ternary", "packing": TERNARY_PACKING}
    if modules:
        (bits, group), _ = Counter(p for _, p in modules).most_common(1)[0]
        config = {"group_size": group, "bits": bits, "mode": "affine"}
    for base, spec in quantized:
        if spec.precision == "ternary":
            cols = next(it.cols for it in items if any(b == base for b, _, _ in it.parts))
            entry = {"mode": "ternary", "packing": TERNARY_PACKING, "bits": 2, "group_size": 64, "in_features": cols}
            if arch == "bitnet":
                entry["act_bits"] = 8
        elif (spec.bits, spec.group_size) != (config["bits"], config["group_size"]) or config["mode"] != "affine":
            entry = {"group_size": spec.group_size, "bits": spec.bits, "mode": "affine"}
        else:
            continue
        for path in dict.fromkeys([base, module_path(base)]):
            config[path] = entry
    return config


# ---------------------------------------------------------------------------------------------- running
def quantize(
    src: str,
    out: str | Path,
    recipe: Recipe,
    *,
    calibrate: str | None = None,
    method: str = "auto",
    dtype: mx.Dtype | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    calib_tokens: int = DEFAULT_TOKENS,
    console=None,
    progress: bool = True,
    stream_experts: bool = False,
    order: str = "identity",
) -> Result:
    """Quantize checkpoint `src` (any name mlxq opens) into a new mlx-lm directory `out`.
    `calibrate`: None (no calibration), "" or "default" (the pinned corpus) or a text file.
    `stream_experts`: routed experts go into expert packs (`mlxq.experts.pack`), in `order` ("identity", or
    "coactivation": renumbered by co-activation on the calibration text, the default corpus when none is given)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if method not in METHODS:
        raise InvalidRequest(f"--method {method}: unknown (known: {', '.join(METHODS)})")
    if method == "gptq" and calibrate is None:
        raise InvalidRequest("--method gptq needs calibration text (--calibrate)")
    method = (AUTO_CALIBRATED if calibrate is not None else AUTO_PLAIN) if method == "auto" else method
    if order != "identity" and not stream_experts:
        raise InvalidRequest(f"--order {order} orders expert packs: it needs --stream-experts")
    out = Path(out).expanduser()

    def opener() -> Checkpoint:
        return float_checkpoint(open_checkpoint(src))

    if (how := quantized_as(open_checkpoint(src))) and recipe.default != "float":
        better = f"mlxq quantize ORIGINAL -o {out.name} (the unquantized checkpoint)"
        console.print(f"mlxq: warning: {lossy_warning(src, how, better)}", style="yellow", highlight=False)
    ckpt = opener()
    _check_paths(ckpt, out)
    the_plan = plan(ckpt, recipe, dtype, stream_experts)
    if the_plan.unknown:
        console.print(
            f"mlxq: {len(the_plan.unknown)} tensors have no known role and are kept as they are "
            f"(first: '{the_plan.unknown[0]}')",
            highlight=False,
        )
    trained_ternary = text_config(ckpt.config).get("model_type") == "bitnet"
    if recipe.warning and not trained_ternary and any(it.spec.precision == "ternary" for it in the_plan.items):
        _warn_ternary(console, recipe.warning)
    stats = None
    routing = order == "coactivation"  # the calibration pass also records which experts are routed together
    if (calibrate is not None and method != "rtn") or routing:
        stats = calibration_stats(opener, calibrate if calibrate is not None else "default", hessian=method == "gptq",
                                  n_tokens=calib_tokens, console=console, coactivation=routing)
        ckpt = opener()  # the calibration model consumed the lazy tensors it loaded
    calibrated = stats is not None and method != "rtn"

    _make_parent(out)
    _clear_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    start = time.perf_counter()
    restore = terminate_cleanly()
    try:
        tmp.mkdir()
        writer = ShardWriter(tmp, the_plan.outputs, shard_bytes)
        packs = None
        if stream_experts:
            from mlxq.experts.write import PackSink

            top_k = int(text_config(ckpt.config).get("num_experts_per_tok") or 1)
            packs = PackSink(tmp, the_plan, order, stats.coactivation if routing else None, top_k)
        try:
            _stream(ckpt, the_plan, writer, method, stats if calibrated else None, console, progress, packs)
        finally:
            writer.abort()
        writer.close()
        _copy_tokenizer(ckpt, tmp)
        config = {k: v for k, v in ckpt.config.items() if k not in ("quantization", "quantization_config")}
        if the_plan.quantization:
            config["quantization"] = config["quantization_config"] = the_plan.quantization
        config["mlxq_quantization"] = {
            "recipe": recipe.name,
            "method": method,
            "calibration": ({"text": calibrate or "default", "tokens": stats.tokens} if calibrated else None),
            "overrides": dict(recipe.overrides),
        }
        if packs is not None:
            config["mlxq_experts"] = packs.close(text_config(ckpt.config))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore()
    return _result(the_plan, out, method, recipe, time.perf_counter() - start)


@contextmanager
def progress_bar(console, label: str, items: list, enabled: bool = True):
    """A tensors-done bar with the read rate; yields `advance(src_bytes)`, called once per item."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = sum(it.src_bytes for it in items)
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not enabled) as bar:
        task = bar.add_task(label, total=len(items), rate="")
        start, done = time.perf_counter(), 0

        def advance(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            rate = done / max(time.perf_counter() - start, 1e-9) / 1e9
            bar.update(task, advance=1, rate=f"{rate:.3f} GB/s ({done / 1e9:.2f}/{total / 1e9:.2f} GB read)")

        yield advance


def _stream(
    ckpt: Checkpoint, the_plan: Plan, writer: ShardWriter, method: str, stats: Stats | None, console, progress: bool,
    packs=None,
) -> None:
    with progress_bar(console, "quantizing", the_plan.items, progress) as advance:
        for item in the_plan.items:
            w = ckpt.tensors[item.name]
            if packs is not None and item.role == "router":
                w = packs.permute_router(item, w)
            if not item.spec.quantized:
                writer.write(item.name, w.astype(item.outputs[0].dtype))
            else:
                for base, lo, hi in item.parts:
                    part = w[..., lo:hi, :] if (lo, hi) != (0, w.shape[-2]) else w
                    if item.spec.precision == "ternary":
                        t = affine.ternary(part, TERNARY_PACKING)
                        writer.write(f"{base}.weight", t.weight)
                        writer.write(f"{base}.scales", t.scales)
                        continue
                    q = _quantize(item.name, part, item.spec, method, stats, the_plan.tied)
                    if item.pack:
                        packs.add(item, base, q.weight, q.scales, q.biases, item.spec)
                        continue
                    for suffix, array in (("weight", q.weight), ("scales", q.scales), ("biases", q.biases)):
                        writer.write(f"{base}.{suffix}", array)
            del w
            mx.clear_cache()  # MLX keeps freed buffers for reuse; handing them back keeps the peak near one tensor
            advance(item.src_bytes)


def _quantize(name: str, w: mx.array, spec: Spec, method: str, stats: Stats | None, tied: bool) -> affine.Quantized:
    importance, hessian = stats.lookup(name, tied) if stats is not None else (None, None)
    if method == "gptq" and hessian is not None and hessian.ndim == w.ndim:
        if w.ndim == 2:
            return gptq(w, hessian, spec.bits, spec.group_size)
        parts = [gptq(w[e], hessian[e], spec.bits, spec.group_size) for e in range(w.shape[0])]
        return affine.Quantized(*(mx.stack([getattr(p, k) for p in parts]) for k in ("weight", "scales", "biases")))
    if method == "rtn":
        return affine.quantize(w, spec.bits, spec.group_size)
    return affine.quantize(w, spec.bits, spec.group_size, importance, "search")


def _result(the_plan: Plan, out: Path, method: str, recipe: Recipe, seconds: float) -> Result:
    q_items = [it for it in the_plan.items if it.spec.quantized]
    q_bytes = sum(t.nbytes for it in q_items for t in it.outputs)
    q_params = sum(_numel(it.outputs[0].shape[:-1]) * it.cols for it in q_items)
    params = sum(_numel(t.shape) for it in the_plan.items if not it.spec.quantized for t in it.outputs) + q_params
    out_bytes = sum(t.nbytes for it in the_plan.items for t in it.outputs)  # packed experts included
    return Result(
        out,
        len(the_plan.items),
        len(q_items),
        sum(it.src_bytes for it in the_plan.items),
        out_bytes,
        params,
        8 * q_bytes / max(q_params, 1),
        8 * out_bytes / max(params, 1),
        seconds,
        method,
        recipe.name,
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------------------------------- files
def _check_paths(ckpt: Checkpoint, out: Path) -> None:
    if out.exists() or out.is_symlink():  # a dangling symlink is there too: rename would not replace it
        raise InvalidRequest(f"{out}: already exists (quantize writes a new directory; remove it or pick another)")
    src = Path(ckpt.path).resolve()
    target = out.resolve()
    if target == src or (src.is_dir() and src in target.parents):
        raise InvalidRequest(f"{out}: inside the source {src} (the source is never written to)")


def _make_parent(out: Path) -> None:
    """The directory OUT goes into, created if missing; a parent that is a file, or a place that cannot be written
    (a read-only mount, no permission), is one InvalidRequest before any work is done."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InvalidRequest(f"{out}: cannot be created: {parent} is not a directory") from None
    except OSError as e:
        raise InvalidRequest(f"{out}: cannot be created in {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidRequest(f"{out}: cannot be created: {parent} is not writable")


def _publish(tmp: Path, out: Path) -> None:
    """Renames the finished directory into place, so OUT appears complete or not at all. Two runs racing for one OUT:
    the first rename wins and the loser's is refused (a rename onto a non-empty directory fails)."""
    try:
        os.rename(tmp, out)
    except OSError as e:
        if out.exists() or out.is_symlink():
            raise InvalidRequest(f"{out}: appeared while quantizing (another run wrote it first); "
                                 "this run's output was discarded") from None
        raise InvalidRequest(f"{out}: cannot be written: {e.strerror or e}") from None


def _clear_stale(out: Path) -> None:
    """Temporary directories left by killed runs (their process is gone) are removed."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate_cleanly():
    """SIGTERM raises SystemExit in the main thread, so the temporary directory is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return lambda: signal.signal(signal.SIGTERM, previous)


# Files of a model directory that are weights or are rewritten here; everything else (tokenizer, chat
# template, generation config, processor configs) is copied as it is.
_NOT_COPIED = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.pt|\.pth|\.gguf|\.h5|\.msgpack|"
    r"\.ckpt|\.npz|^config\.json)$"
)


def _copy_tokenizer(ckpt: Checkpoint, dest: Path) -> None:
    if ckpt.tokenizer_dir is not None and Path(ckpt.tokenizer_dir).is_dir():
        for f in sorted(Path(ckpt.tokenizer_dir).iterdir()):
            if f.is_file() and not f.name.startswith(".") and not _NOT_COPIED.search(f.name):
                shutil.copy2(f, dest / f.name)
        return
    if ckpt.gguf_file is not None:  # GGUF: the tokenizer transformers builds from the file's vocab
        from mlxq.engine.tokenizer import load_tokenizer

        load_tokenizer(None, ckpt.gguf_file, ckpt.chat_template).hf.save_pretrained(str(dest))


def _warn_ternary(console, message: str) -> None:
    global _ternary_warned
    if _ternary_warned:
        return
    _ternary_warned = True
    from rich.panel import Panel

    console.print(Panel(message, title="WARNING", style="bold red"))
