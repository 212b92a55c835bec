"""Qwen3.5 / Qwen3.5-MoE / Qwen3-Next GGUFs: the names tables against llama.cpp's own converter (both directions),
and files written by llama.cpp's converter and in Ollama's conventions loading to transformers' logits, float and
with the quantized tensors kept."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from fixtures_gguf import *  # noqa: F403  (pytest fixtures: hybrid_gguf, hybrid_gguf_q8)
from fixtures_gguf import PROMPT, hf_config, write_legacy_ssm_in, write_ollama_style
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_tokenizer_dir)
from llama_cpp_run import llama_cpp_logits, llama_cpp_quantize
from safetensors.numpy import load_file

from mlxq.formats import open_checkpoint
from mlxq.formats.gguf import names
from mlxq.formats.gguf.doctor import examine, status
from mlxq.formats.gguf.reader import read_bytes, read_header
from mlxq.loading import load_model
from mlxq.models.layers import BlockLinear
from mlxq.models.qwen3_5 import Args, _split_fused_in_proj


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def logits(path, **options) -> np.ndarray:
    net = load_model(open_checkpoint(str(path), **options))
    return np.array(net(mx.array([PROMPT]), net.make_cache())[0])


def hf_tensor(hf: dict, name: str, config: dict) -> np.ndarray:
    """An HF tensor by our name; routed experts are stacked [experts, out, in] here, one tensor each in the file;
    Qwen3-Next's fused q/k/v/z projection split as the model's sanitize splits it (checked against transformers)."""
    if name.endswith((".in_proj_qkv.weight", ".in_proj_z.weight")) and name not in hf:
        fused = name.rsplit(".in_proj_", 1)[0] + ".in_proj_qkvz.weight"
        args = Args.from_config(config)
        return np.array(_split_fused_in_proj({fused: mx.array(hf[fused])}, args)[name])
    if ".mlp.experts." not in name:
        return hf[name]
    prefix, proj = name.rsplit(".mlp.experts.", 1)[0], name.split(".")[-2]
    n = sum(1 for k in hf if k.startswith(f"{prefix}.mlp.experts.") and k.endswith(f".{proj}.weight"))
    return np.stack([hf[f"{prefix}.mlp.experts.{e}.{proj}.weight"] for e in range(n)])


def test_tables_are_llama_cpp_converters_transforms_both_ways(hybrid_gguf):
    """Every tensor llama.cpp's converter wrote: our HF name for it, `to_hf` of its numbers equal to the checkpoint's
    tensor, `to_gguf` of the checkpoint's tensor equal to the file's, and our GGUF name for it the file's name."""
    header = read_header(hybrid_gguf.gguf)
    hf = load_file(hybrid_gguf.hf_dir / "model.safetensors")
    config = hf_config(hybrid_gguf)
    n_layers = config["num_hidden_layers"]
    seen = set()
    for t in header.tensors.values():
        file_value = read_bytes(hybrid_gguf.gguf, t).view(np.float32).reshape(t.shape)
        name = names.hf_name(hybrid_gguf.kind, t.name, n_layers)
        assert name is not None, t.name
        assert names.gguf_name(hybrid_gguf.kind, name) == t.name
        transforms = names.transforms(hybrid_gguf.kind, name)
        want = hf_tensor(hf, name, config)
        np.testing.assert_allclose(names.to_hf_all(transforms, file_value, config), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(names.to_gguf_all(transforms, want, config), file_value, rtol=1e-6, atol=1e-6)
        seen.update(type(x).__name__ for x in transforms)
    assert {"Shift", "NegExp", "Squeeze"} <= seen
    assert ("TiledVHeads" in seen) == (hybrid_gguf.kind != "qwen3next")  # Qwen3-Next's heads stay grouped


def test_llama_cpp_converted_file_gives_transformers_logits(hybrid_gguf):
    ckpt = open_checkpoint(str(hybrid_gguf.gguf))
    config = hf_config(hybrid_gguf)
    for field in ("linear_num_key_heads", "linear_num_value_heads", "linear_value_head_dim", "layer_types"):
        assert ckpt.config[field] == config[field], field
    assert rel(logits(hybrid_gguf.gguf), hybrid_gguf.logits) < 1e-4


def test_quantized_tensors_kept_give_the_dequantized_logits(hybrid_gguf_q8):
    """Q8_0 from llama.cpp's converter, blocks kept: value heads put back on packed rows (qkv, z, b, a) and, where a
    head (16 columns) is narrower than a block (32), the out projection gathers its input instead."""
    path = hybrid_gguf_q8.gguf
    net = load_model(open_checkpoint(str(path), keep_quantized=True))
    layer = net.model.layers[0].linear_attn
    assert isinstance(layer.out_proj, BlockLinear) and "input_order" in layer.out_proj
    assert isinstance(layer.in_proj, nn.QuantizedLinear)  # qkv, z, b, a fused after their rows were reordered
    kept = np.array(net(mx.array([PROMPT]), net.make_cache())[0])
    assert rel(kept, logits(path)) < 1e-4
    assert rel(kept, hybrid_gguf_q8.logits) < 0.05  # and Q8_0 is close to the float model


@pytest.mark.parametrize("fused_ba", [True, False])
@pytest.mark.parametrize("kind", ["qwen35", "qwen35moe"])  # Ollama writes Qwen3.5 (both) this way
def test_ollama_style_file_gives_transformers_logits(_hybrid_models, tmp_path, fused_ba, kind):
    hybrid_gguf = _hybrid_models(kind)
    path = write_ollama_style(hybrid_gguf.gguf, tmp_path / "ollama.gguf", fuse_ba=fused_ba)
    ckpt = open_checkpoint(str(path))
    assert ckpt.config["layer_types"] == hf_config(hybrid_gguf)["layer_types"]  # from the head_count_kv array
    assert not any(name.startswith("v.") for name in ckpt.tensors)
    assert rel(logits(path), hybrid_gguf.logits) < 1e-4


def test_legacy_qwen3next_ssm_in_file_gives_transformers_logits(_hybrid_models, tmp_path):
    """A Qwen3-Next file with the fused ssm_in of llama.cpp's first converter: llama.cpp still runs it (its legacy
    path) to transformers' logits, and mlxq splits it at the edge into the q/k/v and z projections the current
    converter writes as attn_qkv / attn_gate, equal to those, to the same logits."""
    tiny = _hybrid_models("qwen3next")
    path = write_legacy_ssm_in(tiny, tmp_path / "legacy.gguf")
    written = read_header(path).tensors
    assert "blk.0.ssm_in.weight" in written and "blk.0.attn_qkv.weight" not in written
    assert rel(llama_cpp_logits(path, PROMPT), tiny.logits) < 1e-4  # the file is what llama.cpp reads as legacy
    assert status(examine(path)[0]) == 0  # and doctor finds nothing wrong with it
    legacy, current = open_checkpoint(str(path)).tensors, open_checkpoint(str(tiny.gguf)).tensors
    for part in ("in_proj_qkv", "in_proj_z"):
        name = f"model.layers.0.linear_attn.{part}.weight"
        np.testing.assert_array_equal(np.array(legacy[name]), np.array(current[name]))
    assert not any("in_proj_qkvz" in name for name in legacy)
    assert rel(logits(path), tiny.logits) < 1e-4


def test_legacy_ssm_in_quantized_keeps_its_parts_quantized(_hybrid_models, tmp_path):
    """The legacy file quantized by llama.cpp (Q8_0): with the blocks kept, ssm_in's q/k/v and z rows stay MLX affine
    (whole rows taken from the fused tensor), and the model gives the dequantized load's logits."""
    tiny = _hybrid_models("qwen3next")
    path = tmp_path / "legacy-q8_0.gguf"
    llama_cpp_quantize(write_legacy_ssm_in(tiny, tmp_path / "legacy.gguf"), path, "MOSTLY_Q8_0")
    assert read_header(path).tensors["blk.0.ssm_in.weight"].kind == "Q8_0"
    ckpt = open_checkpoint(str(path), keep_quantized=True)
    assert {"model.layers.0.linear_attn.in_proj_qkv.scales", "model.layers.0.linear_attn.in_proj_z.scales"} <= set(
        ckpt.tensors)
    net = load_model(ckpt)
    assert isinstance(net.model.layers[0].linear_attn.in_proj, nn.QuantizedLinear)
    kept = np.array(net(mx.array([PROMPT]), net.make_cache())[0])
    assert rel(kept, logits(path)) < 1e-4
    assert rel(kept, tiny.logits) < 0.05  # and Q8_0 is close to the float model
