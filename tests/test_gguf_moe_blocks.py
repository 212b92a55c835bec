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
            made[arch] = path / "f32.gguf"
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
