"""Checkpoint -> built model with its weights bound (quantized layers where the checkpoint has them)."""

from __future__ import annotations

import functools
import math
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from mlxq.errors import ConfigError, FormatError
from mlxq.formats.base import Checkpoint
from mlxq.glibc import glibc
from mlxq.kernels.kquants import Narrowing
from mlxq.models import build_model, text_config
from mlxq.models.layers import (
    TernaryLinear,
    cpu_layout,
    derived_biases_check,
    drop_derived_biases,
    made_from_scales,
    take_derived_biases,
    to_blocks,
)
from mlxq.models.moe import SwitchLinear

if TYPE_CHECKING:
    from mlxq.distributed.split import Split


def default_dtype() -> mx.Dtype:
    """float32 off Metal: MLX's CPU kernels for half types are several times slower on x86."""
    return mx.float16 if mx.metal.is_available() else mx.float32


def _cast(w: mx.array, dtype: mx.Dtype, keep_narrow: bool = False) -> mx.array:
    """`w` in `dtype` if it is a float; with `keep_narrow`, a narrower float stays as it is when `dtype` is
    float32 (quantized layers' scales and biases: their matmuls promote them exactly, so the cast would only
    double their memory)."""
    if not mx.issubdtype(w.dtype, mx.floating) or w.dtype == dtype:
        return w
    return w if keep_narrow and dtype == mx.float32 else w.astype(dtype)


def _quantization_params(model: nn.Module) -> Callable[[str], bool]:
    """Whether a tensor name is the scales or biases of a quantized layer other than an embedding (a quantized
    embedding's lookup dequantizes in its scales' dtype, which must be the compute dtype) or stacked experts (MLX's
    CPU `gather_qmm` converts all of a layer's expert scales on every call when their dtype is not the input's: a
    resident 2-bit MoE decoded 3x slower with float16 scales)."""
    compute = {path for path, m in model.named_modules() if isinstance(m, (nn.Embedding, SwitchLinear))}
    return lambda name: name.endswith((".scales", ".biases")) and name.rpartition(".")[0] not in compute


def _outsized(ckpt: Checkpoint) -> set[str]:
    """Tensors more than twice the size of every tensor read after them (a small model's embedding among its
    layers). MLX's cache reuses a buffer only for about its own size, so the buffers converting one leaves behind
    would stay through the rest of the load unused (SmolLM2: 8 MB, a load's peak)."""
    sizes = {info.name: info.nbytes for info in ckpt.tensors.infos()}
    out, later = set(), 0
    for name in reversed(list(ckpt.tensors)):
        if later and sizes[name] > 2 * later:
            out.add(name)
        later = max(later, sizes[name])
    return out


def _layer_bits(quant: dict, layer: str) -> int | None:
    """Bits per code of a quantized layer, as the checkpoint's quantization names them (its own entry, or the
    default)."""
    entry = quant.get(layer)
    bits = entry.get("bits") if isinstance(entry, dict) else quant.get("bits")
    return bits if isinstance(bits, int) else None


def float_nbytes(ckpt: Checkpoint) -> int:
    """Bytes the checkpoint's tensors take as float32 (what loading a GGUF without keeping its blocks costs)."""
    return 4 * sum(math.prod(info.shape) for info in ckpt.tensors.infos())


def memory_available() -> int:
    """Bytes of memory available to a new allocation: MemAvailable on Linux, else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits_in_memory(nbytes: int) -> bool:
    """Whether a model of `nbytes` fits comfortably: at most half the available memory (the rest for the KV
    cache, the activations, and everything else running)."""
    return nbytes <= memory_available() // 2


def open_for_run(name: str | None, keep_quantized: bool | None = None) -> Checkpoint:
    """The checkpoint to run: a GGUF file's quantized blocks kept when `keep_quantized`, and by default on Metal or
    when its float32 form would not fit comfortably in memory."""
    from mlxq.formats import open_checkpoint

    _return_freed_memory()  # before the tokenizer's thread starts, so that it shares the one heap
    ckpt = open_checkpoint(name, keep_quantized=mx.metal.is_available() if keep_quantized is None else keep_quantized)
    if keep_quantized is None and ckpt.format == "gguf" and not fits_in_memory(float_nbytes(ckpt)):
        ckpt = open_checkpoint(name, keep_quantized=True)
    return ckpt


def load_model(ckpt: Checkpoint, dtype: mx.Dtype | None = None, fuse: bool = True,
               experts_per_tok: int | None = None, expert_memory: str | int | None = None,
               expert_options: dict | None = None, split: Split | None = None,
               beside: Callable[[], None] | None = None) -> nn.Module:
    """`fuse` merges projections that share an input (q/k/v, gate/up) after loading and puts weights in
    the backend's fastest layout (`inference_layout`); pass False to keep the checkpoint's module layout
    (calibration hooks, weight export). `experts_per_tok` routes each token of a MoE model to that many
    experts instead of the configured `num_experts_per_tok`. A model written with expert packs
    (`mlxq quantize --stream-experts`) streams its experts within `expert_memory` bytes ('8GB', '25%'; see
    `mlxq.experts`, options in `StreamOptions`), or holds them all in memory when that is None. `split`: load only
    one rank's share of the model (`mlxq.distributed.split`): the tensors it wants, the parts of them it holds,
    into its network. `beside` is called once the first weights are queued for conversion, to run beside it
    (`api.load` starts the tokenizer's parse there)."""
    _return_freed_memory()
    config = text_config(ckpt.config)
    with _as_config_error(ckpt):
        model = build_model(config)
    dtype = dtype or default_dtype()
    quant = ckpt.quantization or {}
    affine = "quant_method" not in quant  # mlx-lm's form (a transformers quant_method is the family's to read)
    modules = dict(model.named_modules()) if fuse and affine and split is None else {}
    # derived: layers whose biases are made from their scales (`take_derived_biases`)
    sources, derived = _read_tensors(ckpt, [name for name in ckpt.tensors if split is None or split.wants(name)],
                                     modules, quant, beside)
    del modules  # the modules as built, which fusing replaces: held, they would keep their arrays alive
    # Cast before sanitize, so that its arithmetic (the 1 + w of zero-centred norms) runs at compute precision: in a
    # float16/bfloat16 checkpoint's own type, 1 + w loses most of w's digits. (Lazy: evaluated one at a time below.)
    narrow = _quantization_params(model)
    sources = {name: _cast(w, dtype, narrow(name)) for name, w in sources.items()}
    weights = model.sanitize(dict(sources))
    if split is not None and expert_memory is None and _has_packs(ckpt):
        expert_memory = "100%"  # a rank streams its share of the experts from its own packs: by default all of it stays
    if "mtp" in model and _has_packs(ckpt):  # the packs hold the network's experts, not the MTP head's
        del model["mtp"]
        weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    packs, streamed = _expert_packs(ckpt, model, weights, expert_memory)
    if streamed and split is not None:
        streamed, packs = split.stream_share(streamed, packs)
    if split is not None:
        with _as_config_error(ckpt):
            model, weights = split.take(model, build_model, weights, sources, ckpt.tensors)
    del sources
    # experts read from packs, and parts of tensors read from the file, come in their stored dtype
    weights = {k: _cast(v, dtype, narrow(k)) for k, v in weights.items()}
    if quant and affine:
        with _as_config_error(ckpt):
            _blocks_like(model, quant, dtype)
            _ternary_like(model, weights, quant)
            _quantize_like(model, weights, quant)
    made_from_scales(model, derived)
    check_weights(ckpt.path, dict(tree_flatten(model.parameters())), weights)
    model.load_weights(list(weights.items()), strict=True)
    del weights  # from here only the model holds the checkpoint's arrays, so each can go once it is replaced
    if fuse:
        inference_layout(model)
    if experts_per_tok is not None:
        if not hasattr(model, "set_experts_per_tok"):
            raise ConfigError(f"{ckpt.path}: experts per token: the model has no routed experts")
        model.set_experts_per_tok(experts_per_tok)
    # One tensor at a time, so at most one module's transient copies (read, fused, transposed) exist at once, with
    # MLX's buffer cache off so that what they free goes back to the system instead of adding up.
    cache_limit = mx.set_cache_limit(0)
    try:
        for _, w in tree_flatten(model.parameters()):
            mx.eval(w)
        if fuse:
            drop_derived_biases(model)
    finally:
        mx.set_cache_limit(cache_limit)
    model.eval()
    wire_weights(model)
    if streamed:
        from mlxq.experts import start_pool

        model.expert_pool = start_pool(streamed, packs, expert_memory, dtype, fuse, expert_options)
        weakref.finalize(model, model.expert_pool.close)  # reader threads and file descriptors go with the model
    if split is None:
        return model
    shard = split.finish(model)
    if streamed:
        shard.expert_pool = model.expert_pool
    return shard


# Bytes of the file in the first window of a load (`_read_tensors`): enough that MLX converts it for about as long as
# the tokenizer's parse started beside it takes (SmolLM2: its 30 MB embedding and a few layers). Every later window is
# one module: more in flight would hold more memory at the end of the load, where its peak is.
FIRST_WINDOW_BYTES = 40 << 20
# MLX's cache while reading: enough to reuse a module's transient buffers for the next alike; what it would keep
# beyond that is memory at the load's peak (SmolLM2 Q2_K: 10 MB above main's, its parse beside the first window)
READ_CACHE_BYTES = 8 << 20


def _read_tensors(ckpt: Checkpoint, names: list[str], modules: dict[str, nn.Module], quant: dict,
                  beside: Callable[[], None] | None) -> tuple[dict[str, mx.array], dict[str, int]]:
    """The checkpoint's tensors `names`, a window at a time (`_windows`): a window is read (`TensorSource.read`: a
    GGUF file's bytes read, their conversion built), `beside` is called if it is the first, and its conversion is
    queued (one `mx.async_eval`) with the checks of which layers' biases are derived from their scales
    (`derived_biases_check`, for the layers in `modules`); the window before is resolved (float16 choices made,
    derived biases dropped: `take_derived_biases`) only then. So MLX converts a window while Python reads the next,
    and no tensor waits for MLX on its own; `mx.async_eval` waits for room in MLX's queue with the GIL released, so
    `beside`'s Python runs meanwhile. Returns the tensors and the layers whose biases are dropped, with their factor."""
    tensors: dict[str, mx.array] = {}
    derived: dict[str, int] = {}
    outsized, behind, chosen = _outsized(ckpt), None, []
    cache_limit = mx.set_cache_limit(READ_CACHE_BYTES)
    try:
        for window in _windows(ckpt, names):
            values, made = ckpt.tensors.read(window)
            checks = {}
            for layer in dict.fromkeys(name.rpartition(".")[0] for name in window) if modules else ():
                scales, biases = values.get(f"{layer}.scales"), values.get(f"{layer}.biases")
                if scales is not None and biases is not None:
                    check = derived_biases_check(modules.get(layer), _wide(scales), biases,
                                                 _layer_bits(quant, layer))
                    if check is not None:
                        checks[layer] = check
            if behind is None and beside is not None:
                beside()
            mx.async_eval(chosen + made + list(checks.values()))
            if behind is not None:
                chosen = _resolve(*behind, tensors, derived, quant, outsized)
            behind = values, checks
        if behind is not None:
            _resolve(*behind, tensors, derived, quant, outsized)
    finally:
        mx.set_cache_limit(cache_limit)
    return tensors, derived


def _windows(ckpt: Checkpoint, names: list[str]) -> Iterator[list[str]]:
    """`names` in windows: the first of at least `FIRST_WINDOW_BYTES` of the file, each later one a module's tensors
    (a window always ends with a module's last tensor: its scales and biases are checked together)."""
    window, size = [], 0
    for i, name in enumerate(names):
        window.append(name)
        size += ckpt.tensors.info(name).nbytes
        if i + 1 == len(names) or (size >= FIRST_WINDOW_BYTES and
                                   names[i + 1].rpartition(".")[0] != name.rpartition(".")[0]):
            yield window
            window, size = [], FIRST_WINDOW_BYTES  # from here each module ends a window


def _wide(v: mx.array | Narrowing) -> mx.array:
    return v.wide if isinstance(v, Narrowing) else v


def _resolve(values: dict[str, mx.array | Narrowing], checks: dict[str, mx.array], tensors: dict[str, mx.array],
             derived: dict[str, int], quant: dict, outsized: set[str]) -> list[mx.array]:
    """A window's tensors into `tensors` in their final form, the derived biases its checks found left out; returns
    the float16 forms chosen, made unevaluated (to queue)."""
    for name, v in values.items():
        tensors[name] = v.resolve() if isinstance(v, Narrowing) else v
    for layer, check in checks.items():
        if factor := take_derived_biases(tensors, layer, check, _layer_bits(quant, layer)):
            derived[layer] = factor
    if not outsized.isdisjoint(values):
        mx.clear_cache()  # what converting an outsized tensor left in MLX's cache fits no later tensor
    return [tensors[name] for name, v in values.items() if isinstance(v, Narrowing) and name in tensors]


@functools.cache
def _return_freed_memory() -> None:
    """On glibc, give every buffer of 128 KiB or more its own mapping, returned to the system when freed. By default
    glibc raises that threshold as large buffers are freed, after which freed buffers stay in its heap: loading frees
    many (each tensor as read, before fusing and transposing), and a process would keep their memory at its peak.
    MLX keeps its own cache of buffers while it runs, so this costs nothing afterwards. And one heap for all threads:
    glibc gives each thread that allocates its own, and keeps what is freed in each (MLX's worker thread and the
    tokenizer's loader held ~37 MB more on SmolLM2 by the end of a short generation)."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX: threads share one heap, not one each


def trim_heap() -> None:
    """Hands the heap's freed memory back to the system (glibc's malloc_trim): what a load freed below the mmap
    threshold, the tokenizer's parse of its JSON among it (half of its 28 MB on SmolLM2), stays in the heap
    otherwise."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _has_packs(ckpt: Checkpoint) -> bool:
    from mlxq.experts import has_packs

    return has_packs(ckpt.config)


def _expert_packs(ckpt: Checkpoint, model: nn.Module, weights: dict, expert_memory) -> tuple:
    """Expert packs, if the checkpoint has them: all experts read into `weights` (no `expert_memory`), or the MoE
    blocks swapped for streaming ones (returned, to get their slot pool once the model is complete)."""
    from mlxq.experts import moe_blocks, open_packs, stream_blocks
    from mlxq.experts.pack import check_model

    if not _has_packs(ckpt):
        if expert_memory is not None:
            raise ConfigError(f"{ckpt.path}: expert memory needs expert packs (mlxq quantize --stream-experts)")
        return None, []
    packs = open_packs(ckpt.path, ckpt.config)
    if expert_memory is None:
        check_model(packs, moe_blocks(model))
        weights.update(packs.resident_weights())
        return packs, []
    return packs, stream_blocks(model, packs)


@contextmanager
def _as_config_error(ckpt: Checkpoint):
    """What `formats.validate` cannot foresee about a family's config (a rope setting of the wrong type, say) fails
    as one ConfigError naming the checkpoint, not as a traceback from inside the model's constructor."""
    try:
        yield
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:200]}"
        raise ConfigError(f"{ckpt.path}: the config does not describe a model mlxq can build ({what})") from None


def check_weights(path, expected: dict[str, mx.array], weights: dict[str, mx.array]) -> None:
    """The weights are exactly the parameters the model expects, in name and shape (else one FormatError)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{unexpected[0]}'"
        more = len(missing) + len(unexpected) - 1
        raise FormatError(f"{path}: {what}" + (f" (and {more} more)" if more else ""))
    for name, w in weights.items():
        want = expected[name]
        if w.shape != want.shape:
            raise FormatError(f"{path}: tensor '{name}' has shape {w.shape}, expected {want.shape}")
        # Floats of any width cast to the load dtype; anything else (packed quantized words) must match exactly:
        # an int32 tensor where float weights belong is a damaged header, never weights.
        float_w, float_want = mx.issubdtype(w.dtype, mx.floating), mx.issubdtype(want.dtype, mx.floating)
        if float_w != float_want or (not float_w and w.dtype != want.dtype):
            raise FormatError(f"{path}: tensor '{name}' is {w.dtype}, expected {want.dtype}")


def inference_layout(model: nn.Module) -> None:
    """What loading does after binding the weights, for speed: merge projections that share an input
    (`fuse()`, parents first), then move weights into the backend's fastest layout (`cpu_layout`)."""
    for _, module in model.named_modules():
        if hasattr(module, "fuse"):
            module.fuse()
    cpu_layout(model)


def wire_weights(model: nn.Module) -> None:
    """On Metal, keep the weights wired (never paged out between tokens), up to what the GPU's
    recommended working set allows; elsewhere there is nothing to wire."""
    if not mx.metal.is_available():
        return
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    budget = mx.device_info().get("max_recommended_working_set_size", 0)
    if budget:
        mx.set_wired_limit(min(max(size, 1), budget))


def _blocks_like(model: nn.Module, quant: dict, dtype: mx.Dtype) -> None:
    """Swap in block layers (`models.layers.to_blocks`) where the checkpoint keeps GGML blocks (GGUF types MLX's
    affine format cannot hold exactly): the quantization entry of such a module names its `ggml_type`."""

    def swap(path: str, module: nn.Module) -> nn.Module:
        entry = quant.get(path)
        if isinstance(entry, dict) and "ggml_type" in entry:
            return to_blocks(module, entry["ggml_type"], dtype, input_order=entry.get("input_order", False))
        return module

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))


def _ternary_like(model: nn.Module, weights: dict, quant: dict) -> None:
    """Swap in ternary linears where the checkpoint's quantization names mode "ternary" for the module (mlxq's
    ternary packing: `weight` uint8 codes, `scales` per channel or per tensor)."""
    for path, module in model.named_modules():
        entry = quant.get(path) if isinstance(quant.get(path), dict) else quant
        if entry.get("mode") != "ternary" or not isinstance(module, nn.Linear) or f"{path}.scales" not in weights:
            continue
        dim_out, dim_in = module.weight.shape
        per_tensor = weights[f"{path}.scales"].size == 1
        layer = TernaryLinear(dim_in, dim_out, "bias" in module, packing=entry["packing"], per_tensor=per_tensor,
                              act_bits=entry.get("act_bits"))
        parent, _, name = path.rpartition(".")
        target = model if not parent else _module_at(model, parent)
        if isinstance(target, list):
            target[int(name)] = layer
        else:
            setattr(target, name, layer)


def _module_at(model: nn.Module, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _quantize_like(model: nn.Module, weights: dict, quant: dict) -> None:
    """Swap in quantized layers exactly where the checkpoint has `.scales` (mlx-lm convention)."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights or isinstance(module, TernaryLinear):
            return False
        override = quant.get(path)
        if isinstance(override, dict):
            return {"group_size": override["group_size"], "bits": override["bits"],
                    "mode": override.get("mode", "affine")}
        # Per-layer entries are keyed by the writer's module paths, which need not be ours (mlx-lm's Qwen3.5
        # writes `language_model.model.layers.0.mlp.gate` for our `model.layers.0.mlp.gate`), so the layout is
        # read off the tensors: packed width = in * bits / 32, scales = in / group_size.
        dim_in, packed, scales = module.weight.shape[-1], weights[f"{path}.weight"], weights[f"{path}.scales"]
        if packed.dtype == mx.uint32 and dim_in % scales.shape[-1] == 0 and packed.shape[-1] * 32 % dim_in == 0:
            return {"group_size": dim_in // scales.shape[-1], "bits": packed.shape[-1] * 32 // dim_in,
                    "mode": quant.get("mode", "affine")}
        return True

    nn.quantize(model, group_size=quant.get("group_size", 64), bits=quant.get("bits", 4),
                mode=quant.get("mode", "affine"), class_predicate=predicate)
