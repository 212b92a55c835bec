"""MoE GGUFs whose routed experts are K-quants MLX's affine format cannot hold (Q6_K, Q3_K, Q2_K), made by
llama.cpp's own quantizer: loaded with their blocks kept, the experts are raw blocks behind a gathered block matmul
(`BlockSwitchLinear`), held at about the file's size, and the logits equal the same file loaded dequantized to
float and agree with llama.cpp's within its 8-bit-activation tolerance (test_gguf_export's, 5e-2).

Tiny models with rows of 256 weights (hidden and expert widths), so the K-quants apply to every expert tensor; every
expert active, as in test_gguf_export, so that llama.cpp's rounded activations cannot tip a near-tied route."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from llama_cpp_run import llama_cpp_logits, llama_cpp_quantize
from mlx.utils import tree_flatten
from test_hybrid import make_tiny as make_hybrid
from tiny import WIDE, make_tiny, save_tiny_tokenizer

from mlxq import loading
from mlxq.formats.gguf.export import export
from mlxq.formats.gguf.reader import read_header
from mlxq.models.moe import BlockSwitchLinear
from mlxq.quant.recipes import gguf_recipe

PROMPT = [3, 17, 42, 99, 5, 120, 7, 64, 11, 150, 33, 8, 19, 140]
QUANTIZED_TOLERANCE = 5e-2
EXPERTS_256 = {"moe_intermediate_size": 256, "num_experts": 4, "num_experts_per_tok": 4}
MODELS = {
    "qwen3moe": lambda path: make_tiny("qwen3_moe_norm", path, **WIDE, **EXPERTS_256),
    "qwen35moe": lambda path: make_hybrid("qwen3_5_moe_text", path, hidden_size=256, linear_value_head_dim=16,
                                          shared_expert_intermediate_size=256, **EXPERTS_256),
}
# llama.cpp file types (pure: every tensor whose rows allow it in the type) and the experts' type in them
TYPES = {"Q6_K": "MOSTLY_Q6_K", "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K"}


@pytest.fixture(scope="module")
def float_gguf(tmp_path_factory):
    made = {}

    def get(arch: str):
        if arch not in made:
            path = tmp_path_factory.mktemp(arch)
            MODELS[arch](path / "hf")
            save_tiny_tokenizer(path / "hf", 160)
            made[arch] = path / "f32.gguf"  # (the HF directory is its sibling "hf")
            export(str(path / "hf"), made[arch], gguf_recipe("F32"), progress=False)
        return made[arch]

    return get


def logits(path, keep: bool):
    net = loading.load_model(loading.open_for_run(str(path), keep_quantized=keep))
    return net, np.array(net(mx.array([PROMPT]), net.make_cache())[0])


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(("arch", "kind"), [("qwen3moe", "Q6_K"), ("qwen3moe", "Q3_K"), ("qwen3moe", "Q2_K"),
                                            ("qwen35moe", "Q6_K"), ("qwen35moe", "Q2_K")])
def test_moe_experts_kept_as_blocks_give_the_float_and_llama_cpp_logits(arch, kind, float_gguf, tmp_path):
    path = tmp_path / f"{kind}.gguf"
    llama_cpp_quantize(float_gguf(arch), path, TYPES[kind], pure=True)
    header = read_header(path)
    assert {t.kind for n, t in header.tensors.items() if "_exps." in n} == {kind}
    kept, got = logits(path, keep=True)
    experts = kept.model.layers[0].mlp.experts
    switches = [m for _, m in experts.named_modules() if isinstance(m, BlockSwitchLinear)]
    assert switches and {m.kind for m in switches} == {kind}  # gate/up (maybe fused) and down, all raw blocks
    assert sum(v.nbytes for _, v in tree_flatten(kept.parameters())) < 1.35 * path.stat().st_size
    _, dequantized = logits(path, keep=False)
    assert rel(got, dequantized) < 1e-4
    assert rel(llama_cpp_logits(path, PROMPT), got) <= QUANTIZED_TOLERANCE


def test_fused_expert_tensors_export_like_per_expert_ones(float_gguf, tmp_path):
    """HF's fused 3-D `experts.gate_up_proj` [experts, 2 x inter, hidden] (Qwen3.5-MoE hub checkpoints): its gate
    and up halves are written as ffn_gate_exps / ffn_up_exps, the same file as from transformers' per-expert
    tensors."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from mlxq.formats.gguf.reader import read_bytes

    per_expert = float_gguf("qwen35moe")
    src = tmp_path / "fused"
    shutil.copytree(per_expert.parent / "hf", src)
    tensors = load_file(src / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for p in sorted({k.split(".experts.")[0] + ".experts" for k in tensors if ".experts." in k}):
        n = EXPERTS_256["num_experts"]
        fused[f"{p}.gate_up_proj"] = np.stack([np.concatenate([tensors[f"{p}.{e}.gate_proj.weight"],
                                                               tensors[f"{p}.{e}.up_proj.weight"]]) for e in range(n)])
        fused[f"{p}.down_proj"] = np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    save_file(fused, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "fused.gguf"
    export(str(src), out, gguf_recipe("F32"), progress=False)
    mine, ref = read_header(out).tensors, read_header(per_expert).tensors
    assert mine.keys() == ref.keys()
    assert [n for n in ref if not np.array_equal(read_bytes(out, mine[n]), read_bytes(per_expert, ref[n]))] == []
