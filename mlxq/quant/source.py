"""Float views of checkpoints: mlx-lm quantized triples (weight, scales, biases) turned back into float weights,
lazily, one tensor at a time, so that an already quantized directory can be re-quantized or evaluated.

Evaluation uses the same view on purpose: MLX's quantized matmul on the x86 CPU backend is several times slower
than a float32 matmul with OpenBLAS, and a forward pass with the dequantized float32 weights gives the quantized
model's logits up to float rounding (the weights are exactly scale * code + bias either way).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import mlx.core as mx
import numpy as np

from mlxq.errors import FormatError, UnsupportedModel
from mlxq.formats.base import Checkpoint, TensorInfo, TensorSource
from mlxq.kernels import ternary

# Module paths as a checkpoint names them -> as the loaders name them after their own renaming (mlxq's qwen3_5
# sanitize and mlx-lm's): multimodal prefixes dropped, mlx-lm's switch_mlp and per-expert tensors stacked.
PATH_REWRITES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^model\.mtp\."), "mtp."),  # multi-token prediction, as mlxq's qwen3_5 names it
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),  # Mixtral
    (re.compile(r"(\.experts\.\d+)\.w1$"), r"\1.gate_proj"),
    (re.compile(r"(\.experts\.\d+)\.w2$"), r"\1.down_proj"),
    (re.compile(r"(\.experts\.\d+)\.w3$"), r"\1.up_proj"),
    (re.compile(r"\.switch_mlp\."), ".experts."),
    (re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"), r".experts.\1"),
]


def module_path(path: str) -> str:
    """The path a loader gives the module that holds tensor prefix `path`."""
    for pattern, repl in PATH_REWRITES:
        path = pattern.sub(repl, path)
    return path


# GGUF tensor types that hold plain numbers (every other GGUF type name, upper case, is a block type)
GGUF_PLAIN_DTYPES = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def quantized_as(ckpt: Checkpoint) -> str | None:
    """How `ckpt` is already quantized ("mlx-lm affine 4-bit", "GGUF Q4_K, Q6_K", "ternary (bitnet)"), or None for
    float weights: quantizing such a source again stacks a second rounding on the first."""
    quant = ckpt.quantization
    if isinstance(quant, dict) and quant:
        if quant.get("quant_method") == "bitnet" or quant.get("mode") == "ternary":
            return "ternary (BitNet)"
        return f"{quant.get('quant_method') or 'mlx-lm ' + quant.get('mode', 'affine')} {quant.get('bits', '?')}-bit"
    if ckpt.format == "gguf":
        dtypes = {i.dtype for i in ckpt.tensors.infos()}
        kinds = sorted(d for d in dtypes if d.isupper() and d not in GGUF_PLAIN_DTYPES)
        return f"GGUF {', '.join(kinds)}" if kinds else None
    return None


def lossy_warning(src: str, how: str, better: str) -> str:
    """The warning for re-quantizing a quantized source, naming the better path."""
    return (f"lossy: {src} is already quantized ({how}); this dequantizes it and quantizes it again, which loses "
            f"more than quantizing the original weights once. Better: {better}")


def float_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with every mlx-lm quantized triple (affine, or mlxq's ternary weight + scales) presented as one float
    weight and no `quantization` config; transformers' packed BitNet weights likewise. Checkpoints without
    quantized tensors come back as they are (GGUF sources are opened dequantized)."""
    quant = ckpt.quantization
    infos = {i.name: i for i in ckpt.tensors.infos()}
    if isinstance(quant, dict) and quant.get("quant_method") == "bitnet":
        return _bitnet_float(ckpt, infos)
    bases = {n[: -len(".scales")] for n in infos if n.endswith(".scales") and n[: -len(".scales")] + ".weight" in infos}
    if not bases:
        return ckpt
    if not isinstance(quant, dict):
        raise FormatError(f"{ckpt.path}: tensors have .scales but config.json has no 'quantization'")
    src = ckpt.tensors
    views: dict[str, tuple[tuple[int, ...], Callable[[], mx.array]]] = {}
    for base in bases:
        info, entry = infos[base + ".weight"], _entry(quant, base)
        if entry.get("mode") == "ternary":
            cols, packing = int(entry["in_features"]), entry["packing"]

            def load(base=base, cols=cols, packing=packing) -> mx.array:
                codes = ternary.unpack(src[base + ".weight"], cols, packing).astype(mx.float32)
                return codes * src[base + ".scales"].astype(mx.float32)[..., None]
        else:
            bits, group = _params(ckpt, quant, base, info, infos[base + ".scales"])
            cols = info.shape[-1] * 32 // bits

            def load(base=base, bits=bits, group=group) -> mx.array:
                # float32 scales: dequantizing with the stored float16 ones would round every weight to float16
                w, s = src[base + ".weight"], src[base + ".scales"].astype(mx.float32)
                b = src[base + ".biases"].astype(mx.float32) if base + ".biases" in infos else None
                return mx.dequantize(w, s, b, group_size=group, bits=bits)

        views[base + ".weight"] = ((*info.shape[:-1], cols), load)
    return _float_view(ckpt, infos, views, {f"{b}.{s}" for b in bases for s in ("scales", "biases")})


def _float_view(ckpt: Checkpoint, infos: dict[str, TensorInfo], views: dict, dropped: set[str]) -> Checkpoint:
    """The checkpoint with `views` (name -> (float shape, loader)) in place of those tensors, `dropped` gone and
    no quantization config."""
    out = {}
    for name, info in infos.items():
        if name in views:
            shape = views[name][0]
            out[name] = TensorInfo(name, shape, "float32", _numel(shape) * 4)
        elif name not in dropped:
            out[name] = info
    src = ckpt.tensors

    def load(name: str) -> mx.array:
        return views[name][1]() if name in views else src[name]

    config = {k: v for k, v in ckpt.config.items() if k not in ("quantization", "quantization_config")}

    def host(name: str) -> np.ndarray | None:
        return None if name in views else src.host_float(name)

    return replace(ckpt, config=config, tensors=TensorSource(out, load, host=host), format="hf")


def _entry(quant: dict, base: str) -> dict:
    """The quantization entry of one module: its own, else the default."""
    entry = quant.get(base) or quant.get(module_path(base))
    return entry if isinstance(entry, dict) else quant


def _bitnet_float(ckpt: Checkpoint, infos: dict[str, TensorInfo]) -> Checkpoint:
    """transformers' packed BitNet checkpoint as float weights: codes / weight_scale (see mlxq/models/bitnet.py);
    `weight_scale` tensors disappear into them."""
    from mlxq.models.bitnet import unpack_hf

    src = ckpt.tensors
    views = {}
    for name, info in infos.items():
        if name.endswith(".weight") and name + "_scale" in infos:

            def load(name=name) -> mx.array:
                return unpack_hf(src[name]).astype(mx.float32) / src[name + "_scale"].astype(mx.float32).reshape(())

            views[name] = ((info.shape[0] * 4, *info.shape[1:]), load)
    return _float_view(ckpt, infos, views, {n + "_scale" for n in views})


def _params(ckpt: Checkpoint, quant: dict, base: str, weight: TensorInfo, scales: TensorInfo) -> tuple[int, int]:
    """(bits, group size) of one quantized tensor: its per-layer entry, else the default, checked against shapes."""
    entry = _entry(quant, base)
    if entry.get("mode", "affine") != "affine":
        raise UnsupportedModel(
            f"{ckpt.path}: tensor '{base}.weight' uses quantization mode '{entry.get('mode')}' "
            "(only affine can be re-quantized or evaluated)"
        )
    bits = int(entry.get("bits", 4))
    cols = weight.shape[-1] * 32 // bits
    group = cols // scales.shape[-1] if scales.shape[-1] else 0
    if group != int(entry.get("group_size", group)) or group * scales.shape[-1] != cols:
        raise FormatError(
            f"{ckpt.path}: tensor '{base}.scales' has shape {scales.shape}, which does not fit "
            f"{bits}-bit weights of shape {weight.shape}"
        )
    return bits, group


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
