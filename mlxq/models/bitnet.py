"""BitNet b1.58: Llama's network with ReLU² (or SiLU, 1bitLLM's checkpoints), an RMSNorm on the attention heads'
output (attn_sub_norm) and on the MLP's hidden state (ffn_sub_norm), and ternary linears that round each token's
activations to int8.

Checkpoints come two ways. transformers' packed format (`quantization_config.quant_method` "bitnet",
`linear_class` "bitlinear", as microsoft/bitnet-b1.58-2B-4T ships): each linear's `weight` is uint8
[out / 4, in], output row r + i (out / 4) in bits 2i..2i+1 of row r, stored code + 1; and `weight_scale` [1]
is the reciprocal of the tensor's scale (BitLinear computes y = (xq . t) / (weight_scale * input_scale)).
`sanitize` repacks that into mlxq's ternary layout with scale = 1 / weight_scale. Without a quantization
config the weights are float and the linears plain, as transformers builds them then.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.errors import ConfigError
from mlxq.kernels import ternary
from mlxq.models import llama
from mlxq.models.layers import Attention, GatedMLP, RoPE, TernaryLinear, relu2

HF_ROWS_PER_BYTE = 4
# hidden_act -> the MLP's activation: ReLU² (microsoft/bitnet-b1.58-2B-4T), SiLU (1bitLLM's bitnet_b1_58, what
# llama.cpp's `bitnet` architecture runs)
ACTIVATIONS = {"relu2": relu2, "silu": nn.silu}


def packed_linear(config: dict[str, Any]):
    """The linear layer class the checkpoint's quantization config asks for (None: plain float)."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "bitnet":
        return None
    if q.get("linear_class", "bitlinear") != "bitlinear" or q.get("quantization_mode", "offline") != "offline":
        raise ConfigError(f"config.json: bitnet quantization {q.get('linear_class')}/{q.get('quantization_mode')} "
                          "is not supported (only the packed 'bitlinear' offline format)")
    return partial(TernaryLinear, packing="tq2", per_tensor=True, act_bits=8)


class Block(nn.Module):
    def __init__(self, a: llama.Args, rope: RoPE, linear=None, layer: int = 0, act=relu2):  # (every layer alike)
        super().__init__()
        eps = a.rms_norm_eps
        self.self_attn = Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, rope,
                                   bias=a.attention_bias, out_bias=a.attention_bias, sub_norm_eps=eps, linear=linear)
        self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, act=act, sub_norm_eps=eps, linear=linear)
        self.input_layernorm = nn.RMSNorm(a.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(a.hidden_size, eps=eps)

    __call__ = llama.Block.__call__


class Model(llama.Model):
    def block_for(self, config: dict[str, Any]):
        act = ACTIVATIONS.get(config.get("hidden_act", "relu2"))
        if act is None:
            raise ConfigError(f"config.json: bitnet hidden_act '{config['hidden_act']}' is not supported "
                              f"({', '.join(ACTIVATIONS)})")
        self._packed = packed_linear(config) is not None
        return partial(Block, linear=packed_linear(config), act=act)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        if not self._packed:
            return weights
        out = {}
        for name, w in weights.items():
            if name.endswith(".weight_scale"):
                out[name.removesuffix("weight_scale") + "scales"] = 1.0 / w.astype(mx.float32).reshape(1)
            elif name.endswith("_proj.weight") and w.dtype == mx.uint8:
                out[name] = ternary.pack(unpack_hf(w), "tq2")
            else:
                out[name] = w
        return out


def unpack_hf(packed: mx.array) -> mx.array:
    """transformers' BitNet packing (uint8 [out / 4, in]) -> codes in {-1, 0, 1} [out, in]."""
    shifts = (2 * mx.arange(HF_ROWS_PER_BYTE, dtype=mx.uint8))[:, None, None]
    codes = (packed[None] >> shifts) & 3  # [4, out / 4, in]: block i holds rows i (out / 4) ...
    return codes.reshape(-1, packed.shape[-1]).astype(mx.int8) - 1
