"""Tiny Qwen3.5 GGUFs written the ways the field writes them, and llama.cpp itself to read them.

- llama.cpp's way: its own converter, `convert_hf_to_gguf.py` from the pinned llama-cpp-python sdist (sha256-checked,
  cached by `mlxq.formats.fetch`), run on a tiny random transformers checkpoint with the real Qwen3 tokenizer;
- Ollama's way: that file rewritten with Ollama's conventions (its convert/convert_qwen3next.go, 0.17): `ssm_dt`
  without ".bias", b and a fused as `ssm_ba`, the three HF rope sections, a per-layer `head_count_kv` array, its
  own keys (`ssm.v_head_reordered`, `mrope_sections`, ...), and vision tensors in the same file;

    from fixtures_qwen3 import *  # noqa: F403  (the Qwen3 tokenizer fixture these use)
    from fixtures_gguf import *  # noqa: F403
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from pinned import fetched
from tiny import HYBRID_TEXT, randomise_hybrid

from mlxq.formats.fetch import LLAMA_CPP_SDIST, fetch_source

__all__ = ["_hybrid_models", "dense_gguf", "hybrid_gguf", "hybrid_gguf_q8", "moe_gguf"]  # pytest fixtures

# Key heads != value heads (2 vs 4), so the value-head reordering matters; value head dim = key head dim and rope
# sections that fit the 4 rotary dims, as llama.cpp's qwen35 requires to run it.
GGUF_TEXT = {**HYBRID_TEXT, "linear_value_head_dim": 16, "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [1, 1, 0], "mrope_interleaved": True}}
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48)
KINDS = {"qwen35": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {}),
         "qwen35moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", MOE),
         "qwen3next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", MOE)}  # llama.cpp: experts in every layer
PROMPT = [(37 * i + 11) % 5000 for i in range(24)]
CONVERTER = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion", "vendor/llama.cpp/gguf-py")


@dataclass
class TinyHybrid:
    kind: str  # GGUF architecture
    hf_dir: Path
    gguf: Path  # written by llama.cpp's converter, F32
    logits: np.ndarray  # transformers' logits for PROMPT


def convert_with_llama_cpp(hf_dir: Path, out: Path, outtype: str = "f32", mtp: bool = False) -> Path:
    """llama.cpp's converter, as shipped in the pinned sdist, on an HF checkpoint directory (`mtp`: with the
    multi-token-prediction blocks)."""
    src = fetched("llama.cpp's converter", lambda: fetch_source(LLAMA_CPP_SDIST, CONVERTER)) / "vendor" / "llama.cpp"
    done = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
                           *([] if mtp else ["--no-mtp"]), "--outfile", str(out)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return out


def _build(kind: str, path: Path, tokenizer_dir: Path) -> TinyHybrid:
    import torch
    import transformers

    cfg_cls, model_cls, extra = KINDS[kind]
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(1)
    config = getattr(transformers, cfg_cls)(**{**GGUF_TEXT, **extra, "vocab_size": len(tok)},
                                            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    model = getattr(transformers, model_cls)(config).eval()
    randomise_hybrid(model)
    hf_dir = path / "hf"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
    return TinyHybrid(kind, hf_dir, convert_with_llama_cpp(hf_dir, path / f"{kind}.gguf"), logits)


@pytest.fixture(scope="session")
def _hybrid_models(qwen3_tokenizer_dir, tmp_path_factory):
    """Builds each tiny model (and its llama.cpp conversion) once per session, on first use."""
    built: dict[str, TinyHybrid] = {}

    def get(kind: str) -> TinyHybrid:
        if kind not in built:
            built[kind] = _build(kind, tmp_path_factory.mktemp(kind), qwen3_tokenizer_dir)
        return built[kind]

    return get


@pytest.fixture(scope="session", params=sorted(KINDS))
def hybrid_gguf(request, _hybrid_models) -> TinyHybrid:
    """A tiny Qwen3.5 (dense, MoE) and Qwen3-Next converted by llama.cpp's converter, with transformers' logits."""
    return _hybrid_models(request.param)


@pytest.fixture(scope="session")
def dense_gguf(_hybrid_models) -> TinyHybrid:
    return _hybrid_models("qwen35")


@pytest.fixture(scope="session")
def moe_gguf(_hybrid_models) -> TinyHybrid:
    return _hybrid_models("qwen35moe")


@pytest.fixture(scope="session")
def hybrid_gguf_q8(_hybrid_models) -> TinyHybrid:
    """The dense tiny Qwen3.5 converted to Q8_0 by llama.cpp's converter (quantized DeltaNet tensors whose value
    heads llama.cpp reordered)."""
    tiny = _hybrid_models("qwen35")
    return replace(tiny, gguf=convert_with_llama_cpp(tiny.hf_dir, tiny.gguf.with_name("qwen35-q8_0.gguf"), "q8_0"))


def write_ollama_style(src: Path, out: Path, fuse_ba: bool = True) -> Path:
    """A llama.cpp-converted Qwen3.5 GGUF rewritten as Ollama writes one (see the module doc). The numbers are
    llama.cpp's (Ollama's converter makes the same value-head reordering and flags it), only names, metadata and
    packing change. Written with gguf-py's writer."""
    from mlxq.formats.gguf.reader import read_bytes, read_header

    header = read_header(src)
    meta = header.meta
    arch = meta["general.architecture"]
    n = int(meta[f"{arch}.block_count"])
    recurrent = meta[f"{arch}.attention.recurrent_layers"]
    kv_heads = int(meta[f"{arch}.attention.head_count_kv"])
    sections = [int(x) for x in meta[f"{arch}.rope.dimension_sections"][:3]]
    w = _same_metadata(src, out, skip={f"{arch}.attention.recurrent_layers", f"{arch}.attention.head_count_kv",
                                       f"{arch}.rope.dimension_sections", "tokenizer.ggml.pre"})
    w.add_array(f"{arch}.attention.head_count_kv", [0 if r else kv_heads for r in recurrent[:n]])
    w.add_array(f"{arch}.rope.dimension_sections", sections)
    w.add_array(f"{arch}.mrope_sections", sections)
    w.add_array(f"{arch}.rope.mrope_section", sections)
    w.add_bool(f"{arch}.rope.mrope_interleaved", True)
    w.add_bool(f"{arch}.ssm.v_head_reordered", True)
    w.add_string("tokenizer.ggml.pre", "qwen35")
    if arch == "qwen35moe":
        w.add_bool(f"{arch}.norm_top_k_prob", True)
    assert all(t.kind == "F32" for t in header.tensors.values())
    tensors = {name: read_bytes(src, t).view(np.float32).reshape(t.shape) for name, t in header.tensors.items()}
    for name, data in tensors.items():
        if name.endswith(".ssm_alpha.weight") and fuse_ba:
            continue
        if name.endswith(".ssm_beta.weight") and fuse_ba:
            alpha = tensors[name.replace("ssm_beta", "ssm_alpha")]
            w.add_tensor(name.replace("ssm_beta", "ssm_ba"), np.concatenate([data, alpha]))
        elif name.endswith(".ssm_dt.bias"):
            w.add_tensor(name.removesuffix(".bias"), data)
        elif name.endswith(".ffn_gate_inp_shexp.weight"):
            w.add_tensor(name, data.reshape(-1))
        else:
            w.add_tensor(name, data)
    rng = np.random.default_rng(0)  # a vision tower in the same file, as Ollama ships Qwen3.5
    for name, shape in {"v.patch_embd.weight": (32, 3 * 16 * 16), "v.blk.0.attn_qkv.weight": (96, 32),
                        "v.blk.0.attn_out.weight": (32, 32), "mm.0.weight": (64, 128)}.items():
        w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _same_metadata(src: Path, out: Path, skip: set[str] = frozenset()):
    """A gguf-py writer for `out` holding `src`'s metadata (but the keys in `skip`)."""
    import gguf

    from mlxq.formats.gguf.reader import Strings, read_header

    header = read_header(src)
    w = gguf.GGUFWriter(str(out), header.meta["general.architecture"])
    for key, value in header.meta.items():
        if key in skip or key == "general.architecture":
            continue
        if isinstance(value, Strings):
            value = value.read(src)
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        kind, item = header.types[key]
        sub = None if item is None else gguf.GGUFValueType(item)
        w.add_key_value(key, value, gguf.GGUFValueType(kind), sub_type=sub)
    return w


def write_legacy_ssm_in(tiny: TinyHybrid, out: Path) -> Path:
    """The tiny Qwen3-Next as llama.cpp's first Qwen3-Next converter wrote it: HF's in_proj_qkvz as it is (rows
    grouped per key head as [q | k | v | z]) named `ssm_in` (gguf-py's tensor map still maps it so; llama.cpp's
    graph splits it by views, its "legacy" path), where the current converter writes attn_qkv and attn_gate."""
    from safetensors.numpy import load_file

    from mlxq.formats.gguf.reader import read_bytes, read_header

    assert tiny.kind == "qwen3next"
    header = read_header(tiny.gguf)
    hf = load_file(tiny.hf_dir / "model.safetensors")
    w = _same_metadata(tiny.gguf, out)
    for name, t in header.tensors.items():
        block, _, part = name.removeprefix("blk.").partition(".")
        if part == "attn_gate.weight":  # (full attention layers have none: their gate is in attn_q)
            continue
        if part == "attn_qkv.weight":
            w.add_tensor(f"blk.{block}.ssm_in.weight", hf[f"model.layers.{block}.linear_attn.in_proj_qkvz.weight"])
        else:
            w.add_tensor(name, read_bytes(tiny.gguf, t).view(np.float32).reshape(t.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def hf_config(tiny: TinyHybrid) -> dict:
    return json.loads((tiny.hf_dir / "config.json").read_text())
