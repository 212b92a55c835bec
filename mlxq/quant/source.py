"""Float views of checkpoints: mlx-lm quantized triples (weight, scales, biases) turned back into float weights,
lazily, one tensor at a time, so that an already quantized directory can be re-quantized or evaluated.

Evaluation uses the same view on purpose: MLX's quantized matmul on the x86 CPU backend is several times slower
than a float32 matmul with OpenBLAS, and a forward pass with the dequantized float32 weights gives the quantized
model's logits up to float rounding (the weights are exactly scale * code + bias either way).
"""

from __future__ import annotations

import re
from dataclasses import replace

import mlx.core as mx

from mlxq.errors import FormatError, UnsupportedModel
from mlxq.formats.base import Checkpoint, TensorInfo, TensorSource

# Module paths as a checkpoint names them -> as the loaders name them after their own renaming (mlxq's qwen3_5
# sanitize and mlx-lm's): multimodal prefixes dropped, mlx-lm's switch_mlp and per-expert tensors stacked.
PATH_REWRITES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\.model\."), "model."),
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


def float_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with every mlx-lm quantized triple presented as one float weight and no `quantization` config.
    Checkpoints without quantized triples come back as they are (GGUF sources are opened dequantized)."""
    quant = ckpt.quantization
    infos = {i.name: i for i in ckpt.tensors.infos()}
    bases = {n[: -len(".scales")] for n in infos if n.endswith(".scales") and n[: -len(".scales")] + ".weight" in infos}
    if not bases:
        return ckpt
    if not isinstance(quant, dict):
        raise FormatError(f"{ckpt.path}: tensors have .scales but config.json has no 'quantization'")
    out: dict[str, TensorInfo] = {}
    params: dict[str, tuple[int, int]] = {}
    for name, info in infos.items():
        base = name.rsplit(".", 1)[0]
        if base in bases and name.endswith((".scales", ".biases")):
            continue
        if base in bases and name.endswith(".weight"):
            bits, group = _params(ckpt, quant, base, info, infos[base + ".scales"])
            cols = info.shape[-1] * 32 // bits
            params[name] = (bits, group)
            shape = (*info.shape[:-1], cols)
            out[name] = TensorInfo(name, shape, "float32", _numel(shape) * 4)
        else:
            out[name] = info
    src = ckpt.tensors

    def load(name: str) -> mx.array:
        if name not in params:
            return src[name]
        base = name[: -len(".weight")]
        bits, group = params[name]
        # float32 scales: dequantizing with the stored float16 ones would round every weight to float16
        w, s = src[name], src[base + ".scales"].astype(mx.float32)
        b = src[base + ".biases"].astype(mx.float32) if base + ".biases" in infos else None
        return mx.dequantize(w, s, b, group_size=group, bits=bits)

    config = {k: v for k, v in ckpt.config.items() if k not in ("quantization", "quantization_config")}
    return replace(ckpt, config=config, tensors=TensorSource(out, load), format="hf")


def _params(ckpt: Checkpoint, quant: dict, base: str, weight: TensorInfo, scales: TensorInfo) -> tuple[int, int]:
    """(bits, group size) of one quantized tensor: its per-layer entry, else the default, checked against shapes."""
    entry = quant.get(base) or quant.get(module_path(base))
    entry = entry if isinstance(entry, dict) else quant
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
