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
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxq.errors import ConfigError, InvalidRequest, UnsupportedModel
from mlxq.formats import open_checkpoint
from mlxq.formats.base import Checkpoint
from mlxq.formats.gguf import allocate, names
from mlxq.formats.gguf.calibrated import choose_codes
from mlxq.formats.gguf.codecs import CODECS, FALLBACK, FLOAT_TYPES, block_size, encode
from mlxq.formats.gguf.parallel import Encoders, worker_count
from mlxq.formats.gguf.vocab import tokenizer_metadata
from mlxq.formats.gguf.writer import GGUFOut, TensorOut, Value
from mlxq.models import text_config
from mlxq.models.layers import RoPE, rope_settings
from mlxq.quant.calibrate import DEFAULT_TOKENS, Stats, calibration_stats
from mlxq.quant.pipeline import ModelShape, progress_bar, terminate_cleanly
from mlxq.quant.recipes import FLOORS, Recipe
from mlxq.quant.roles import in_mtp, in_vision, role_of
from mlxq.quant.source import float_checkpoint, lossy_warning, module_path, quantized_as

GGML_QUANT_VERSION = 2  # general.quantization_version, as llama-quantize writes it


@dataclass
class Item:
    """One GGUF tensor: its HF-side name, what is written, and where its numbers come from."""

    hf: str
    out: TensorOut
    role: str | None
    source: Source

    @property
    def src_bytes(self) -> int:
        return self.source.nbytes


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


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """Where one GGUF tensor's numbers are in the checkpoint: one tensor, some of its rows (a fused gate_up_proj's
    half, a part of a fused projection), or several stacked (per-expert tensors -> one [experts, out, in] tensor)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    rows: tuple[int, ...] | None = None  # along the second-to-last axis
    undo: tuple[names.Transform, ...] = ()  # an mlx-lm checkpoint's own layout -> HF's (`to_hf` of each)

    def load(self, ckpt: Checkpoint) -> np.ndarray:
        w = ckpt.tensors.host_float(self.names[0]) if len(self.names) == 1 else None
        if w is not None:  # read from the file as float32 without MLX (mapped where it is stored so)
            w = w if self.rows is None else np.take(w, self.rows, axis=-2)
        else:
            arrays = [ckpt.tensors[n] for n in self.names]
            w = mx.stack(arrays) if len(arrays) > 1 else arrays[0]
            if self.rows is not None:
                w = mx.take(w, mx.array(self.rows), axis=-2)
            w = np.asarray(w.astype(mx.float32) if mx.issubdtype(w.dtype, mx.floating) else w)
        for t in self.undo:
            w = t.to_hf(w, {})
        return w

    def as_gguf(self, ckpt: Checkpoint, arch: str, hf: str, config: dict[str, Any]) -> np.ndarray:
        """The tensor as llama.cpp's converter writes it for `arch` (under HF name `hf`). A GGUF source that stores it
        so gives it as stored: mapped, no transform there and back (two copies of a permuted Q or K), bytes exact."""
        if len(self.names) == 1 and self.rows is None and not self.undo:
            found = ckpt.tensors.stored_float(self.names[0])
            if found is not None and found[1] == names.transforms(arch, hf):
                return found[0]
        return names.to_gguf(arch, hf, self.load(ckpt), config)

    def take(self, rows) -> Source:
        """These of its rows (indices into this source's own rows)."""
        mine = tuple(int(r) for r in rows) if self.rows is None else tuple(self.rows[int(r)] for r in rows)
        shape = (*self.shape[:-2], len(mine), self.shape[-1])
        return replace(self, shape=shape, nbytes=self.nbytes * len(mine) // self.shape[-2], rows=mine)


_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def sources(ckpt: Checkpoint) -> dict[str, Source]:
    """The checkpoint's tensors under the names the GGUF tables use (HF's text-model names, experts stacked as
    `...mlp.experts.gate_proj.weight` [experts, out, in]), in checkpoint order."""
    out: dict[str, Source] = {}
    experts: dict[str, list] = {}
    for info in ckpt.tensors.infos():
        name = module_path(info.name)  # the text model's own names, mlx-lm's switch_mlp as experts
        shape = tuple(info.shape)
        if m := _PER_EXPERT.match(name):
            experts.setdefault(f"{m.group(1)}.{m.group(3)}.weight", []).append((int(m.group(2)), info))
            out.setdefault(f"{m.group(1)}.{m.group(3)}.weight", None)  # keeps checkpoint order
        elif m := _FUSED_EXPERTS.match(name):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.down_proj.weight"] = Source((info.name,), shape, info.dtype, info.nbytes)
            else:
                fused, half = Source((info.name,), shape, info.dtype, info.nbytes), shape[-2] // 2
                for i, kind in enumerate(("gate_proj", "up_proj")):
                    out[f"{m.group(1)}.{kind}.weight"] = fused.take(range(i * half, (i + 1) * half))
        else:
            out[name] = Source((info.name,), shape, info.dtype, info.nbytes)
    for name, parts in experts.items():
        parts.sort(key=lambda p: p[0])
        first = parts[0][1]
        out[name] = Source(tuple(i.name for _, i in parts), (len(parts), *first.shape), first.dtype,
                           sum(i.nbytes for _, i in parts))
    return out


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


def model_metadata(cfg: dict[str, Any], arch: str, path, mtp_layers: int = 0) -> dict[str, str | int | float | list]:
    """The `{arch}.*` keys for an HF config, after checking it is something llama.cpp runs as the config says;
    `mtp_layers` multi-token-prediction blocks follow the model's own (hybrid Qwens)."""
    keys: dict[str, Any] = {}
    cfg = {**cfg, "num_experts": cfg.get("num_experts") or cfg.get("num_local_experts")}  # (transformers 5's name)
    moe = bool(cfg["num_experts"])  # dense configs may still carry expert fields (unused defaults)
    for key, field in names.CONFIG_KEYS.items():
        if cfg.get(field) is not None and key in names.WRITTEN_KEYS and (moe or not key.startswith("expert_")):
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
    elif rope["rope_type"] not in ("default", "llama3", "freq_factors"):  # (these two: `_rope_factors`)
        raise UnsupportedModel(f"{path}: rope_type '{rope['rope_type']}' cannot be exported to GGUF")
    if arch == "llama":
        keys["rope.dimension_count"] = head_dim
    if arch == "gemma3":
        keys.update(_gemma3_keys(cfg, head_dim, path))
    if names.ARCHITECTURES[arch].hybrid:
        keys.update(_hybrid_keys(cfg, arch, head_dim, rope, path))
        if mtp_layers:  # llama.cpp counts them in block_count, and they are attention blocks
            keys[names.BLOCK_COUNT] += mtp_layers
            keys[names.NEXTN_LAYERS] = mtp_layers
            keys[names.RECURRENT_LAYERS] += [False] * mtp_layers
    if moe:
        _check_moe(cfg, arch, path)
    if arch == "bitnet":
        if cfg.get("hidden_act", "relu2") != "silu":  # e.g. microsoft/bitnet-b1.58-2B-4T's ReLU²
            raise ConfigError(f"{path}: hidden_act '{cfg.get('hidden_act', 'relu2')}', but llama.cpp's bitnet "
                              "(1bitLLM's bitnet_b1_58) always runs SiLU (the output would differ)")
        if not cfg.get("tie_word_embeddings", False):
            raise ConfigError(f"{path}: tie_word_embeddings is false, but llama.cpp's bitnet always uses the "
                              "embedding as the output head")
        if heads * head_dim != cfg["hidden_size"]:
            raise ConfigError(f"{path}: heads x head_dim != hidden_size, which llama.cpp's bitnet assumes")
    return {f"{arch}.{k}": v for k, v in keys.items()}


def _check_moe(cfg: dict[str, Any], arch: str, path) -> None:
    """llama.cpp's MoE graphs (qwen3moe, qwen35moe, qwen3next) renormalise the chosen experts' weights and route in
    every layer."""
    if not cfg.get("norm_topk_prob", True):
        raise ConfigError(f"{path}: norm_topk_prob is false, but llama.cpp's {arch} always renormalises the "
                          "chosen experts' weights (the output would differ)")
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ConfigError(f"{path}: mlp_only_layers {cfg.get('mlp_only_layers')} / decoder_sparse_step "
                          f"{cfg.get('decoder_sparse_step', 1)}: llama.cpp's {arch} has routed experts in every layer")


def _hybrid_keys(cfg: dict[str, Any], arch: str, head_dim: int, rope: dict, path) -> dict[str, Any]:
    """Gated DeltaNet (ssm.*), partial rotary, M-RoPE sections and the layer schedule of the hybrid Qwens."""
    n = cfg["num_hidden_layers"]
    if cfg["linear_value_head_dim"] != cfg["linear_key_head_dim"]:
        raise ConfigError(f"{path}: linear_value_head_dim {cfg['linear_value_head_dim']} differs from "
                          f"linear_key_head_dim {cfg['linear_key_head_dim']}; llama.cpp's {arch} sizes both from one "
                          "key (ssm.state_size)")
    rotary = int(head_dim * rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25)))
    keys: dict[str, Any] = {
        names.SSM_INNER_SIZE: cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"],
        names.ROPE_DIMENSION_COUNT: rotary,
        "full_attention_interval": int(cfg.get("full_attention_interval", 4)),
    }
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % keys["full_attention_interval"] == 0
                                       else "linear_attention" for i in range(n)]
    keys[names.RECURRENT_LAYERS] = [t == "linear_attention" for t in types]
    if arch in ("qwen35", "qwen35moe"):
        keys[names.ROPE_SECTIONS] = _rope_sections(rope, rotary, path)
        # Ollama's engine reads llama.cpp's layout but takes these two from keys of its own, both off by default
        keys[names.OLLAMA_V_HEADS_TILED] = keys[names.OLLAMA_MROPE_INTERLEAVED] = True
    return keys


def _rope_sections(rope: dict, rotary: int, path) -> list[int]:
    """Qwen3.5's 4 interleaved M-RoPE sections. llama.cpp gives rotary pair s the position stream s % 3 (t, h, w)
    while s < 3 * sections[s % 3], else a fourth stream, which is not the token's position for text; and it
    aborts (GGML_ASSERT(sect_dims <= ne0)) when the sections add up to more than the rotary width. So the sections
    must count, per stream, the pairs that fall to it: [11, 11, 10] for the 32 pairs of a 64-wide rotary (what
    llama.cpp's converter writes by default), derived the same way when the config states none."""
    pairs = rotary // 2
    need = [len(range(k, pairs, 3)) for k in range(3)]
    given = rope.get("mrope_section")
    if given is None:
        return [*need, 0]
    sections = [int(x) for x in given] + [0] * (4 - len(given))
    if len(sections) != 4 or sum(sections) > rotary or any(s < n for s, n in zip(sections, need, strict=False)):
        raise ConfigError(f"{path}: rope_parameters.mrope_section {list(given)} does not fit a {rotary}-wide rotary "
                          f"(head_dim x partial_rotary_factor; llama.cpp needs {need}, or aborts / misplaces "
                          "positions)")
    return sections


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
    """Llama 3.1's frequency scaling, stored by llama.cpp as per-frequency factors (`rope_freqs.weight`); a GGUF source
    gives them as they are (its config's `freq_factors`)."""
    rope = rope_settings(cfg, "full_attention")
    if rope["rope_type"] == "freq_factors":
        return np.array(rope["factors"], dtype=np.float32)
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


def plan(ckpt: Checkpoint, recipe: Recipe, warn=lambda text: None, mtp: bool = True) -> Plan:
    """What to write; `mtp`: the multi-token-prediction blocks too, where the architecture has them in llama.cpp."""
    cfg = text_config(ckpt.config)
    arch = names.gguf_arch(cfg.get("model_type"))
    if arch is None:
        raise UnsupportedModel(f"{ckpt.path}: model_type '{cfg.get('model_type')}' cannot be exported to GGUF "
                               f"(supported: {', '.join(sorted(names.EXPORT_ARCHITECTURES))})")
    shape_of = ModelShape.of(ckpt)
    found = sources(ckpt)
    mtp_layers = names.mtp_layers(found) if mtp and names.ARCHITECTURES[arch].hybrid else 0
    metadata = {k: _value(v) for k, v in model_metadata(cfg, arch, ckpt.path, mtp_layers).items()}
    items, skipped = [], []
    # mlx-lm's hybrid Qwen checkpoints keep the conv as [channels, kernel, 1] and the norms as 1 + w (as the model's
    # sanitize tells them apart): brought back to HF's layout before the converter's transforms
    mlx_lm = any(hf.endswith("conv1d.weight") and len(s.shape) == 3 and s.shape[1] != 1 == s.shape[2]
                 for hf, s in found.items())
    for hf, src, target in _named(arch, found, cfg, ckpt.path):
        if mlx_lm and (undo := names.mlx_lm_layout(arch, hf)):
            shape = src.shape
            for t in undo:
                shape = t.hf_shape(shape)
            src = replace(src, shape=shape, undo=undo)
        role = role_of(hf, cfg.get("model_type"))
        if ((in_mtp(hf) and not mtp_layers) or in_vision(hf) or role == "rope"
                or (hf.endswith("lm_head.weight") and shape_of.tied)):
            skipped.append(hf)
            continue
        if target is None:
            raise UnsupportedModel(f"{ckpt.path}: tensor '{hf}' has no GGUF name for architecture '{arch}'")
        shape = names.gguf_shape(arch, hf, src.shape)
        spec = shape_of.spec(recipe, hf, role, shape, src.dtype)
        items.append(Item(hf, TensorOut(target, shape, tensor_kind(recipe, spec, role, shape)), role, src))
    extra = []
    if (factors := _rope_factors(cfg)) is not None:
        extra.append((TensorOut("rope_freqs.weight", factors.shape, "F32"), factors))
    if any(it.out.kind == "TQ1_0" for it in items):
        warn("TQ1_0 has no Metal kernels in llama.cpp (those layers run on the CPU) and crashed Ollama 0.17.4; "
             "TQ2_0 runs on Metal")
    if skipped and any(in_mtp(n) for n in skipped):
        warn(f"{sum(in_mtp(n) for n in skipped)} multi-token-prediction tensors are not exported")
    return Plan(arch, cfg, metadata, items, extra, skipped, shape_of.tied)


def _named(arch: str, found: dict[str, Source], cfg: dict[str, Any], path):
    """(HF name, source, GGUF name or None) of each tensor to write: a fused source whose GGUF tensor llama.cpp's
    converter writes as parts (Qwen3-Next's in_proj_qkvz) comes out as those parts."""
    n_layers = cfg["num_hidden_layers"]
    for hf, src in found.items():
        target = names.gguf_name(arch, hf, n_layers)
        hit = None if target is None else names.split(arch, target)
        if hit is None:
            yield hf, src, target
            continue
        prefix = re.match(r"^(.*\.layers\.\d+)\.", hf).group(1)  # the parts' block: model.layers.N
        try:
            rows = hit[1].rows(src.shape[-2], cfg)
        except ValueError as e:
            raise ConfigError(f"{path}: tensor '{hf}' {src.shape} does not fit the config's head sizes ({e})") from None
        for part, index in zip(hit[1].parts, rows, strict=True):
            name = f"{prefix}.{part}"
            yield name, src.take(index), names.gguf_name(arch, name, n_layers)


# ---------------------------------------------------------------------------------------------- running
def lossy_source(ckpt: Checkpoint, recipe: Recipe) -> str | None:
    """How `ckpt` is quantized, when exporting it with `recipe` quantizes it again (None: a float export only
    dequantizes, and ternary weights fit TQ1_0 / TQ2_0 exactly)."""
    how = quantized_as(ckpt)
    if how is None or recipe.default in FLOAT_TYPES or (how.startswith("ternary") and recipe.default.startswith("TQ")):
        return None
    return how


# How `--calibrate` chooses codes. imatrix: ggml's importance-weighted fits with mlxq's importance matrix (what
# llama-quantize --imatrix does, byte for byte given the same matrix). gptq: codes and block scales chosen against
# each layer's Hessian (formats/gguf/calibrated.py), never worse than imatrix on the calibration text, row by row,
# and 30-50 % lower in Hessian-weighted error on held-back text, layer by layer. Yet on SmolLM2 (bench/gguf_export.py
# --part quality, 8192 calibration tokens, KL scored by llama-perplexity) gptq / llama.cpp+imatrix is 1.144 at
# Q4_K_M, 0.954 at Q3_K_M and 1.017 at Q2_K, against 0.997, 0.998, 1.005 for imatrix. allocate (the default):
# imatrix's codes, and tensor types moved within the mix by the KL each move measurably adds on the calibration text,
# at no more than the mix's bits (formats/gguf/allocate.py); on SmolLM2 (same bench, --methods allocate) KL /
# llama.cpp+imatrix's is 0.91 at Q4_K_M, 0.43 at Q3_K_M and 0.2 at Q2_K. Its pass runs layer by layer like
# calibration (no gradients), so it fits where calibration does; it costs about one more calibration pass
# (~30 variants x 1024 tokens) and ~4 encodes of each tensor.
CALIBRATION_METHODS = ("imatrix", "gptq", "allocate")
DEFAULT_METHOD = "allocate"


def export(src: str, out: str | Path, recipe: Recipe, *, calibrate: str | None = None, method: str = DEFAULT_METHOD,
           calib_tokens: int = DEFAULT_TOKENS, console=None, progress: bool = True, mtp: bool = True,
           workers: int | None = None) -> Result:
    """Export checkpoint `src` (any name mlxq opens) as the GGUF file `out` in `recipe`'s types; `calibrate` (a text
    file, or "default" for the pinned corpus) chooses codes by `method`; `mtp`: with the multi-token-prediction
    blocks (Qwen3.5 / Qwen3-Next); `workers`: processes encoding beside this one (None: one per other core this
    process may use, none for a small model; parallel.py)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out = Path(out).expanduser()
    if method not in CALIBRATION_METHODS:
        raise InvalidRequest(f"--method {method}: unknown (known: {', '.join(CALIBRATION_METHODS)})")
    raw = open_checkpoint(src)
    if out.exists():
        raise InvalidRequest(f"{out}: already exists (export writes a new file; remove it or pick another)")
    if Path(raw.path).resolve() == out.resolve():
        raise InvalidRequest(f"{out}: is the source")
    if how := lossy_source(raw, recipe):
        better = f"mlxq export ORIGINAL -o {out.name} --type {recipe.name} (the unquantized checkpoint)"
        console.print(f"mlxq: warning: {lossy_warning(src, how, better)}", style="yellow", highlight=False)
    ckpt = float_checkpoint(raw)
    stats = None
    if calibrate is not None:

        def opener() -> Checkpoint:
            return float_checkpoint(open_checkpoint(src))

        stats = calibration_stats(opener, calibrate, hessian=method == "gptq", n_tokens=calib_tokens,
                                  console=console)
        ckpt = opener()  # the calibration model consumed the lazy tensors it loaded

    def warn(text: str) -> None:
        console.print(f"mlxq: warning: {text}", style="yellow", highlight=False)

    the_plan = plan(ckpt, recipe, warn, mtp)
    if workers is None:
        workers = worker_count(sum(math.prod(it.out.shape) for it in the_plan.items if it.out.kind in CODECS))
    if method == "allocate" and stats is not None:
        the_plan = allocated(opener, the_plan, stats, calibrate, console, workers)
        ckpt = opener()
    metadata = dict(the_plan.metadata)
    metadata.update(_general(ckpt, recipe))
    metadata.update(tokenizer_metadata(ckpt, int(the_plan.config.get("vocab_size") or 0), warn))
    tensors = [t for t, _ in the_plan.extra] + [it.out for it in the_plan.items]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    restore = terminate_cleanly()
    blocks = [it.out for it in the_plan.items if it.out.kind in CODECS]
    try:
        gguf = GGUFOut(out, the_plan.arch, metadata, tensors)
        # the workers are reaped after the file is synced: their exits overlap the sync
        with Encoders(gguf.tmp, workers, max((t.shape[-1] for t in blocks), default=0), out) as encoders, gguf as f:
            for t, data in the_plan.extra:
                f.write(t.name, data)
            with progress_bar(console, "exporting", the_plan.items, progress) as advance:
                for item in the_plan.items:
                    _write(f, encoders, ckpt, the_plan, item, stats, method)
                    advance(item.src_bytes)
            encoders.finish()
    finally:
        restore()
    params = sum(math.prod(t.shape) for t in tensors)
    return Result(out, len(tensors), out.stat().st_size, params, dict(Counter(t.kind for t in tensors)),
                  time.perf_counter() - start, recipe.name)


def _write(f: GGUFOut, encoders: Encoders, ckpt: Checkpoint, the_plan: Plan, item: Item, stats: Stats | None,
           method: str) -> None:
    """One tensor's GGUF data into `f`: plain, importance-weighted (both by `encoders`, block types spread over its
    workers), or by GPTQ where the layer's Hessian is known."""
    w = item.source.as_gguf(ckpt, the_plan.arch, item.hf, the_plan.config).reshape(item.out.shape)
    importance, hessian = calibration_for(the_plan, item, stats)
    kind = item.out.kind
    # the embedding's rows are also looked up, where the head's Hessian says nothing: it keeps ggml's fit
    if method == "gptq" and hessian is not None and w.ndim == 2 and item.role != "embedding":
        f.write(item.out.name, choose_codes(w, hessian, kind, importance))
    elif kind in CODECS:
        encoders.encode(item.out.name, f.place(item.out.name), w, kind, importance)
    else:
        f.write(item.out.name, encode(w, kind))
    mx.clear_cache()


def allocated(opener: Callable[[], Checkpoint], the_plan: Plan, stats: Stats, text: str, console,
              workers: int = 0) -> Plan:
    """`the_plan` with each group's types moved by `allocate.choose` (measured KL, bits at most the mix's); the
    candidates encoded by `workers` processes besides this one."""
    from rich.progress import Progress

    from mlxq.engine.tokenizer import load_tokenizer
    from mlxq.models import build_model
    from mlxq.quant.calibrate import text_key, token_batches

    ckpt = opener()
    tok = load_tokenizer(ckpt.tokenizer_dir, ckpt.gguf_file, ckpt.chat_template)
    batches = token_batches(tok, text_key(text)[1], allocate.MEASURE_TOKENS, allocate.MEASURE_SEQ)
    shape = build_model(text_config(ckpt.config))  # lazy: its parameters are never evaluated
    params, n_layers = allocate.parameter_names(shape), len(shape.layers)
    # a tensor the model holds as it is (not a part of a fused or stacked one) can be swapped in the forward pass
    items = {it.hf: it for it in the_plan.items if it.out.kind in CODECS and it.hf in params
             and it.source.names == (it.hf,) and it.source.rows is None and not it.source.undo}
    tensors = [allocate.Tensor(it.hf, re.sub(r"^blk\.\d+\.", "", it.out.name), it.out.kind, it.out.shape[-1],
                               math.prod(it.out.shape)) for it in items.values()]

    errors: dict[tuple[str, str], float] = {}  # filled as the pass makes each tensor's candidates

    def measure(variants: list[allocate.Variant]) -> list[float]:
        source = opener()  # a forward pass consumes the lazy tensors it loads

        def weights(wanted: list[tuple[str, str]]) -> list[mx.array]:
            made = requantized(source, the_plan, [(items[name], kind) for name, kind in wanted], stats, encoders)
            errors.update(zip(wanted, (e for _, e in made), strict=True))
            return [mx.array(w) for w, _ in made]

        with Progress(console=console, transient=True) as bar:
            layers = bar.add_task(f"allocating: {len(variants)} variants, layer by layer", total=n_layers)
            return allocate.measured_kl(source, batches, variants, weights, lambda: bar.advance(layers))

    console.print(f"allocating: KL measured on {len(batches)} x {allocate.MEASURE_SEQ} tokens", highlight=False)
    with trial_encoders(workers, max((it.out.shape[-1] for it in items.values()), default=0)) as encoders:
        pick = allocate.choose(measure, tensors, lambda name, kind: errors[name, kind],
                               lambda line: console.print(f"allocating: {line}", highlight=False))
    moved = [replace(it, out=replace(it.out, kind=pick[it.hf])) if it.hf in pick else it for it in the_plan.items]
    return replace(the_plan, items=moved)


@contextmanager
def trial_encoders(workers: int, widest: int) -> Iterator[Encoders]:
    """Encoders (`workers` processes besides this one) into a scratch file of their own, for `requantized`. Ended,
    and the scratch file removed, also on Ctrl-C and SIGTERM."""
    restore = terminate_cleanly()
    try:
        with tempfile.TemporaryDirectory(prefix="mlxq-trial-") as scratch:
            path = Path(scratch) / "encoded"
            path.touch()
            with Encoders(path, workers, widest, path) as encoders:
                yield encoders
    finally:
        restore()


def requantized(ckpt: Checkpoint, the_plan: Plan, wanted: list[tuple[Item, str]], stats: Stats | None,
                encoders: Encoders) -> list[tuple[np.ndarray, float]]:
    """Each (item, kind)'s tensor as the export would write it at `kind` (importance-weighted with `stats`), read back
    in the checkpoint's own layout and shape (float32), and its importance-weighted squared error. All are encoded
    side by side by `encoders` (from `trial_encoders`) before the first is read back."""
    from mlxq.kernels import kquants

    sources, places, at = {}, [], 0
    for item, kind in wanted:
        if item.hf not in sources:  # (its weights and importance, once for all its types)
            w = item.source.as_gguf(ckpt, the_plan.arch, item.hf, the_plan.config).reshape(item.out.shape)
            sources[item.hf] = w, calibration_for(the_plan, item, stats)[0]
        w, importance = sources[item.hf]
        encoders.encode(item.hf, at, w, kind, importance)
        places.append((at, replace(item.out, kind=kind).nbytes))
        at += places[-1][1]
    encoders.wait()
    out = []
    for (item, kind), (at, size) in zip(wanted, places, strict=True):
        w, importance = sources[item.hf]
        data = np.fromfile(encoders.path, np.uint8, size, offset=at)
        q = np.asarray(kquants.dequantize(mx.array(data), kind)).reshape(item.out.shape)
        error = float(((w - q) ** 2 * (1.0 if importance is None else importance)).sum())
        back = names.to_hf_all(names.transforms(the_plan.arch, item.hf), q, the_plan.config)
        out.append((np.asarray(back, np.float32).reshape(item.source.shape), error))
    return out


def calibration_for(the_plan: Plan, item: Item, stats: Stats | None) -> tuple[np.ndarray | None, mx.array | None]:
    """(importance [in] or [experts, 1, in], Hessian [in, in]) of one GGUF tensor, its input channels in the GGUF's
    order; (None, None) for tensors that are not block-quantized or whose input was never seen."""
    if stats is None or item.out.kind not in CODECS:
        return None, None
    importance, hessian = stats.lookup(item.hf, the_plan.tied)
    if importance is None:
        return None, None
    order = names.column_order(the_plan.arch, item.hf, item.out.shape[-1], the_plan.config)
    if order is not None:  # the statistics follow the moved input channels
        importance = importance[..., mx.array(order)]
        hessian = None if hessian is None else hessian[mx.array(order)][:, mx.array(order)]
    return np.asarray(importance), hessian


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
