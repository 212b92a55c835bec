"""GGUF export: any checkpoint mlxq opens -> one GGUF file llama.cpp and Ollama load, one tensor at a time.

Plan first (no weight is read): the GGUF architecture and metadata from the HF config, checked for what
llama.cpp would refuse or mis-run; the tokenizer's keys; each tensor's GGUF name, shape and block type, chosen
by the recipe over mlxq's tensor roles (llama.cpp's mixes are recipes too) and moved to the type llama.cpp
would fall back to when a row is not a whole number of blocks. Then stream: read one tensor (dequantized when
the source is quantized), apply what llama.cpp's converter does to it (names.py), encode it (codecs.py), write
it. The file appears only when complete.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxq.errors import ConfigError, InvalidRequest, UnsupportedModel
from mlxq.formats import open_checkpoint
from mlxq.formats.base import Checkpoint
from mlxq.formats.gguf import names
from mlxq.formats.gguf.codecs import CODECS, FALLBACK, FLOAT_TYPES, block_size, encode
from mlxq.formats.gguf.vocab import tokenizer_metadata
from mlxq.formats.gguf.writer import GGUFOut, TensorOut, Value
from mlxq.models import text_config
from mlxq.models.layers import RoPE, rope_settings
from mlxq.quant.calibrate import DEFAULT_TOKENS, Stats, calibration_stats
from mlxq.quant.gptq import gptq_blocks
from mlxq.quant.pipeline import ModelShape, progress_bar, terminate_cleanly
from mlxq.quant.recipes import FLOORS, Recipe
from mlxq.quant.roles import in_mtp, role_of
from mlxq.quant.source import float_checkpoint

GGML_QUANT_VERSION = 2  # general.quantization_version, as llama-quantize writes it


@dataclass
class Item:
    """One source tensor and what it becomes."""

    hf: str
    out: TensorOut
    role: str | None
    src_bytes: int


@dataclass
class Plan:
    arch: str
    config: dict[str, Any]
    metadata: dict[str, Value]
    items: list[Item]
    extra: list[tuple[TensorOut, np.ndarray]]  # tensors the converter adds (llama 3's rope factors)
    skipped: list[str]  # source tensors llama.cpp has no place for (MTP, vision), not written
    tied: bool  # the embedding is also the output head


@dataclass
class Result:
    out: Path
    tensors: int
    bytes_out: int
    params: int
    types: dict[str, int]
    seconds: float
    recipe: str

    @property
    def bpw(self) -> float:
        return 8 * self.bytes_out / max(self.params, 1)


# ---------------------------------------------------------------------------------------------- metadata
def _value(v: Any) -> Value:
    """A metadata value typed as llama.cpp's loader expects it: ints uint32, floats float32, lists by element."""
    import gguf

    T = gguf.GGUFValueType
    if isinstance(v, bool):
        return Value(v, T.BOOL)
    if isinstance(v, int):
        return Value(v, T.UINT32)
    if isinstance(v, float):
        return Value(v, T.FLOAT32)
    if isinstance(v, str):
        return Value(v, T.STRING)
    return Value(list(v), T.ARRAY, T.get_type(v[0]))


def model_metadata(cfg: dict[str, Any], arch: str, path) -> dict[str, str | int | float | list]:
    """The `{arch}.*` keys for an HF config, after checking it is something llama.cpp runs as the config says."""
    keys: dict[str, Any] = {}
    for key, field in names.CONFIG_KEYS.items():
        if cfg.get(field) is not None:
            keys[key] = cfg[field]
    for key in ("rope.freq_base", "attention.layer_norm_rms_eps", "final_logit_softcapping"):
        if key in keys:
            keys[key] = float(keys[key])
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    keys["attention.key_length"] = keys["attention.value_length"] = head_dim
    rope = rope_settings(cfg, "full_attention")
    keys["rope.freq_base"] = float(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        keys["rope.scaling.type"], keys["rope.scaling.factor"] = "linear", float(rope["factor"])
    elif rope["rope_type"] not in ("default", "llama3"):
        raise UnsupportedModel(f"{path}: rope_type '{rope['rope_type']}' cannot be exported to GGUF")
    if arch == "llama":
        keys["rope.dimension_count"] = head_dim
    if arch == "gemma3":
        keys.update(_gemma3_keys(cfg, head_dim, path))
    return {f"{arch}.{k}": v for k, v in keys.items()}


def _gemma3_keys(cfg: dict[str, Any], head_dim: int, path) -> dict[str, Any]:
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedModel(f"{path}: attn_logit_softcapping is not supported by llama.cpp's gemma3")
    # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for its 62-layer (27B) model
    heads = cfg["num_attention_heads"]
    want = cfg["hidden_size"] // heads if cfg["num_hidden_layers"] == 62 else head_dim
    if float(cfg.get("query_pre_attn_scalar", want)) != float(want):
        raise ConfigError(f"{path}: query_pre_attn_scalar {cfg['query_pre_attn_scalar']} differs from the "
                          f"{want} llama.cpp's gemma3 uses for this shape (the output would differ)")
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % cfg.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(n)]
    local = rope_settings(cfg, "sliding_attention")
    if "sliding_attention" not in (cfg.get("rope_parameters") or {}):
        local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    if local["rope_type"] != "default":
        raise UnsupportedModel(f"{path}: scaled rope on sliding layers cannot be exported to GGUF")
    return {"attention.sliding_window": int(cfg["sliding_window"]),
            "attention.sliding_window_pattern": [t == "sliding_attention" for t in types],
            "rope.freq_base_swa": float(local["rope_theta"])}


def _rope_factors(cfg: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.1's frequency scaling, stored by llama.cpp as per-frequency factors (`rope_freqs.weight`)."""
    rope = rope_settings(cfg, "full_attention")
    if rope["rope_type"] != "llama3":
        return None
    dims = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    plain = RoPE(dims, {**rope, "rope_type": "default"})._periods
    return np.array(RoPE(dims, rope)._periods / plain, dtype=np.float32)


def file_type(recipe: Recipe) -> int:
    import gguf

    name = "ALL_F32" if recipe.name == "F32" else f"MOSTLY_{recipe.name}"
    return int(gguf.LlamaFileType[name]) if name in gguf.LlamaFileType.__members__ else 0


# ---------------------------------------------------------------------------------------------- planning
def _float_kind(recipe: Recipe, role: str | None, shape: tuple[int, ...]) -> str:
    """The float type of an unquantized tensor: 1-D tensors and the small state tensors stay float32 (as llama.cpp's
    converter keeps them), others take the recipe's float type, or float16 in a quantized file."""
    if len(shape) == 1 or (role in FLOORS and FLOORS[role] is None):
        return "F32"
    return recipe.default if recipe.default in FLOAT_TYPES else "F16"


def tensor_kind(recipe: Recipe, spec, role: str | None, shape: tuple[int, ...]) -> str:
    kind = spec.precision if spec.quantized else (
        spec.precision if spec.precision in FLOAT_TYPES else _float_kind(recipe, role, shape))
    if kind in FLOAT_TYPES and (len(shape) == 1 or (role in FLOORS and FLOORS[role] is None)):
        kind = "F32"
    while shape[-1] % block_size(kind):  # llama.cpp's fallback for rows that are not whole blocks
        kind = FALLBACK.get(kind, "F16")
    return kind


def plan(ckpt: Checkpoint, recipe: Recipe, warn=lambda text: None) -> Plan:
    cfg = text_config(ckpt.config)
    arch = names.gguf_arch(cfg.get("model_type"))
    if arch is None:
        raise UnsupportedModel(f"{ckpt.path}: model_type '{cfg.get('model_type')}' cannot be exported to GGUF "
                               f"(supported: {', '.join(sorted(names.EXPORT_ARCHITECTURES))})")
    shape_of = ModelShape.of(ckpt)
    metadata = {k: _value(v) for k, v in model_metadata(cfg, arch, ckpt.path).items()}
    items, skipped = [], []
    for info in ckpt.tensors.infos():
        hf = info.name
        role = role_of(hf, cfg.get("model_type"))
        if in_mtp(hf) or role in ("vision", "rope") or (hf.endswith("lm_head.weight") and shape_of.tied):
            skipped.append(hf)
            continue
        target = names.gguf_name(arch, hf)
        if target is None:
            raise UnsupportedModel(f"{ckpt.path}: tensor '{hf}' has no GGUF name for architecture '{arch}'")
        shape = names.gguf_shape(arch, hf, tuple(info.shape))
        spec = shape_of.spec(recipe, hf, role, shape, info.dtype)
        items.append(Item(hf, TensorOut(target, shape, tensor_kind(recipe, spec, role, shape)), role, info.nbytes))
    extra = []
    if (factors := _rope_factors(cfg)) is not None:
        extra.append((TensorOut("rope_freqs.weight", factors.shape, "F32"), factors))
    if skipped and any(in_mtp(n) for n in skipped):
        warn(f"{sum(in_mtp(n) for n in skipped)} multi-token-prediction tensors are not exported")
    return Plan(arch, cfg, metadata, items, extra, skipped, shape_of.tied)


# ---------------------------------------------------------------------------------------------- running
def lossy_source(ckpt: Checkpoint) -> str | None:
    """Why exporting `ckpt` loses more than quantizing its original weights once, or None."""
    if ckpt.quantization:
        return f"{ckpt.path} is an mlx-lm quantized directory"
    kinds = Counter(i.dtype for i in ckpt.tensors.infos() if i.dtype in CODECS)
    if kinds:
        return f"{ckpt.path} holds quantized GGUF blocks ({', '.join(sorted(kinds))})"
    return None


def export(src: str, out: str | Path, recipe: Recipe, *, calibrate: str | None = None,
           calib_tokens: int = DEFAULT_TOKENS, console=None, progress: bool = True) -> Result:
    """Export checkpoint `src` (any name mlxq opens) as the GGUF file `out` in `recipe`'s types."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out = Path(out).expanduser()
    raw = open_checkpoint(src)
    if out.exists():
        raise InvalidRequest(f"{out}: already exists (export writes a new file; remove it or pick another)")
    if Path(raw.path).resolve() == out.resolve():
        raise InvalidRequest(f"{out}: is the source")
    if why := lossy_source(raw):
        console.print(f"mlxq: warning: lossy: {why}; exporting dequantizes and quantizes it again, which loses "
                      "more than quantizing the original weights once. Better: export from the original "
                      "(unquantized) checkpoint.", style="yellow", highlight=False)
    ckpt = float_checkpoint(raw)
    stats = None
    if calibrate is not None:

        def opener() -> Checkpoint:
            return float_checkpoint(open_checkpoint(src))

        stats = calibration_stats(opener, calibrate, hessian=True, n_tokens=calib_tokens, console=console)
        ckpt = opener()  # the calibration model consumed the lazy tensors it loaded

    def warn(text: str) -> None:
        console.print(f"mlxq: warning: {text}", style="yellow", highlight=False)

    the_plan = plan(ckpt, recipe, warn)
    metadata = dict(the_plan.metadata)
    metadata.update(_general(ckpt, recipe))
    metadata.update(tokenizer_metadata(ckpt, int(the_plan.config.get("vocab_size") or 0), warn))
    tensors = [t for t, _ in the_plan.extra] + [it.out for it in the_plan.items]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    restore = terminate_cleanly()
    try:
        with GGUFOut(out, the_plan.arch, metadata, tensors) as f:
            for t, data in the_plan.extra:
                f.write(t.name, data)
            with progress_bar(console, "exporting", the_plan.items, progress) as advance:
                for item in the_plan.items:
                    f.write(item.out.name, _encoded(ckpt, the_plan, item, stats))
                    advance(item.src_bytes)
    finally:
        restore()
    params = sum(math.prod(t.shape) for t in tensors)
    return Result(out, len(tensors), out.stat().st_size, params, dict(Counter(t.kind for t in tensors)),
                  time.perf_counter() - start, recipe.name)


def _encoded(ckpt: Checkpoint, the_plan: Plan, item: Item, stats: Stats | None) -> np.ndarray:
    """One tensor's GGUF data. Calibrated: codes chosen by GPTQ error feedback where the layer's Hessian is known,
    else by ggml's importance-weighted fits (experts: importance only)."""
    w = ckpt.tensors[item.hf]
    w = np.asarray(w.astype(mx.float32) if mx.issubdtype(w.dtype, mx.floating) else w)
    w = names.to_gguf(the_plan.arch, item.hf, w, the_plan.config).reshape(item.out.shape)
    kind = item.out.kind
    importance = hessian = None
    if stats is not None and kind in CODECS:
        importance, hessian = stats.lookup(item.hf, the_plan.tied)
    if hessian is not None and w.ndim == 2:
        data = gptq_blocks(w, hessian, CODECS[kind], np.asarray(importance))
    else:
        data = encode(w, kind, None if importance is None else np.asarray(importance))
    mx.clear_cache()
    return data


def _general(ckpt: Checkpoint, recipe: Recipe) -> dict[str, Value]:
    import gguf

    K = gguf.Keys.General
    meta = {K.NAME: _value(Path(ckpt.path).stem), K.FILE_TYPE: _value(file_type(recipe))}
    if recipe.default not in FLOAT_TYPES:
        meta[K.QUANTIZATION_VERSION] = _value(GGML_QUANT_VERSION)
    return meta


def summary(result: Result) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(result.types.items(), key=lambda kv: -kv[1]))
    return (f"{result.out}: {result.tensors} tensors ({kinds}), {result.bytes_out / 1e6:.1f} MB, "
            f"{result.bpw:.2f} bits per weight, {result.seconds:.1f} s")
