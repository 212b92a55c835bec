"""Blocks shared by the model families: norms, rotary embeddings, attention, MLPs, config reading."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.errors import ConfigError
from mlxq.kernels import kquants, ternary
from mlxq.kernels.rows import joined_rows


# ---------------------------------------------------------------------------------------------- config
@dataclass
class BaseArgs:
    """Model hyper-parameters read from an HF config dict; families subclass and add their fields."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaseArgs:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in config and _required(f)]
        if missing:
            raise ConfigError(f"config.json: missing field '{missing[0]}' for {config.get('model_type')}")
        return cls(**{k: v for k, v in config.items() if k in names})


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def rope_settings(config: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """Rope theta and scaling from either config style: transformers-5 `rope_parameters` (possibly keyed
    by layer type) or the older `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters") or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    scaling = dict(config.get("rope_scaling") or {})
    out = {**scaling, **params}
    out.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    return out


# ---------------------------------------------------------------------------------------------- rope
class RoPE(nn.Module):
    """Rotary embedding over the first `dims` features (default, linear and llama3 kinds).

    On Metal, `mx.fast.rope` is a fused kernel. MLX's CPU fallback recomputes the angles on every call
    (about 70 us per call here, a tenth of a decode step over 30 layers), so off Metal the angles come
    from a cached cos/sin table and the rotation is one compiled elementwise function.
    """

    def __init__(self, dims: int, settings: dict[str, Any], traditional: bool = False):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        base = float(settings["rope_theta"])
        kind = settings["rope_type"]
        scale = 1.0
        if kind == "linear":
            scale = 1.0 / float(settings["factor"])
        if kind == "llama3":
            periods = _llama3_freqs(dims, base, settings)
        elif kind in ("default", "linear"):
            periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        elif kind == "freq_factors":  # GGUF Llama 3.1+: per-frequency divisors stored with the weights
            periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims) * mx.array(settings["factors"])
        else:
            raise ConfigError(f"config.json: rope_type '{kind}' is not supported")
        # angle(position, i) = position * scale / periods[i]; kept as periods for mx.fast.rope's `freqs`
        self._periods = periods / scale
        self._table = (mx.zeros((0, dims // 2)), mx.zeros((0, dims // 2)))
        self._use_table = not mx.metal.is_available() and not traditional

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if not self._use_table:
            return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0,
                                offset=offset, freqs=self._periods)
        L = x.shape[-2]
        if isinstance(offset, int):
            cos, sin = self._angles(offset + L)
            cos, sin = cos[offset : offset + L], sin[offset : offset + L]
        else:  # one offset per batch row: angles computed here, since reading the max offset would sync
            theta = (offset.reshape(-1, 1, 1) + mx.arange(L)[None, None])[..., None] / self._periods
            cos, sin = mx.cos(theta), mx.sin(theta)
        return _rotate_half(x, cos, sin, self.dims)

    def _angles(self, n: int) -> tuple[mx.array, mx.array]:
        if self._table[0].shape[0] < n:
            size = max(n, 2 * self._table[0].shape[0], 1024)
            theta = mx.arange(size, dtype=mx.float32)[:, None] / self._periods[None]
            self._table = (mx.cos(theta), mx.sin(theta))
            mx.eval(self._table)
        return self._table


@partial(mx.compile, shapeless=False)
def _rotate_half_impl(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_half(x: mx.array, cos: mx.array, sin: mx.array, dims: int) -> mx.array:
    if dims == x.shape[-1]:
        return _rotate_half_impl(x, cos, sin)
    return mx.concatenate([_rotate_half_impl(x[..., :dims], cos, sin), x[..., dims:]], axis=-1)


def _llama3_freqs(dims: int, base: float, s: dict[str, Any]) -> mx.array:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short kept, smooth between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    inv = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # wavelength / 2pi
    wavelen = 2 * math.pi * inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = mx.where(wavelen > old_ctx / low, inv * factor, inv)
    mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return mx.where(mid, inv / ((1 - smooth) / factor + smooth), scaled)


# ---------------------------------------------------------------------------------------------- blocks
_ON_METAL = mx.metal.is_available()


class Linear(nn.Linear):
    """nn.Linear with a faster single-row (decode) path off Metal.

    MLX's CPU matmul is always a BLAS sgemm, which packs the weight before multiplying; for one row that
    packing is most of the cost. After loading, `transpose_weight()` stores the weight as `weight_t` [in, out]
    (contiguous), and x @ weight_t packs faster than x @ W.T or W @ x: OpenBLAS 0.3.21 here streams a
    32000x1024 weight at 16.6 GB/s against 10.7 (x @ W.T) and 9.2 (W @ x), same speed for long prompts.
    Without it, a single row is computed as W @ x, which beats x @ W.T for wide weights."""

    def __call__(self, x: mx.array) -> mx.array:
        if "weight_t" in self:
            y = x @ self["weight_t"]
        elif _ON_METAL or x.size != x.shape[-1]:
            return super().__call__(x)
        else:
            y = (self["weight"] @ x.reshape(-1, 1)).reshape(*x.shape[:-1], -1)
        return y + self["bias"] if "bias" in self else y

    def transpose_weight(self) -> None:
        """Switch to the [in, out] layout (an inference-only layout: `weight` is gone afterwards)."""
        if "weight" in self:
            self.weight_t = mx.contiguous(self["weight"].T)
            del self.weight

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


DEQUANTIZE_FROM_ROWS = kquants.DEQUANTIZE_FROM_ROWS


def _quantized_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ W^T for an affine-quantized layer (QuantizedLinear, QuantizedEmbedding.as_linear): MLX's quantized matmul
    for a few rows, else the weight dequantized a slice of rows at a time (`kquants.sliced_matmul`)."""
    weight, scales = layer["weight"], layer["scales"]
    if _ON_METAL or layer.mode != "affine" or x.size // x.shape[-1] < DEQUANTIZE_FROM_ROWS:
        step = kquants.slice_rows(4 * scales.shape[-1])
        if not _made_from_scales(layer) or weight.shape[0] <= step:
            return mx.quantized_matmul(x, weight, scales, _biases(layer), transpose=True, group_size=layer.group_size,
                                       bits=layer.bits, mode=layer.mode)
        # biases made from the scales (`drop_derived_biases`) a slice of rows at a time: a wide layer (a tied
        # output head: SmolLM2's 3.4 MB of float32 biases) holds one slice's, not all of them, at every token
        return kquants.by_row_slices(weight.shape[0], step, lambda start, stop: mx.quantized_matmul(
            x, weight[start:stop], scales[start:stop], _biases(layer, slice(start, stop), True), transpose=True,
            group_size=layer.group_size, bits=layer.bits, mode=layer.mode))
    biases = _biases(layer)
    return kquants.sliced_matmul(x, weight.shape[0], lambda start, stop: kquants.affine_dequantize(
        weight[start:stop], scales[start:stop], biases[start:stop], layer.group_size, layer.bits, x.dtype))


def _made_from_scales(layer: nn.Module) -> bool:
    """Whether `drop_derived_biases` dropped the layer's biases (never on Metal): each use makes them again."""
    return "biases" not in layer and getattr(layer, "bias_per_scale", None) is not None


def _biases(layer: nn.Module, rows: mx.array | slice | None = None, product: bool | None = None) -> mx.array | None:
    """A quantized layer's biases (those of `rows` only, if given): its own, or made from its scales where
    `drop_derived_biases` dropped them. Made in float32 for a product (the default without `rows`; float16 arithmetic
    is several times slower on x86; MLX's matmuls promote biases to float32 anyway), in the scales' dtype for a
    lookup's few rows (whose output takes the scales' dtype, as with biases held)."""
    if not _made_from_scales(layer):
        biases = layer.get("biases")
        return biases if biases is None or rows is None else biases[rows]
    scales = layer["scales"] if rows is None else layer["scales"][rows]
    return (scales.astype(mx.float32) if product or rows is None else scales) * layer.bias_per_scale


def derived_biases_check(module: nn.Module | None, scales: mx.array, biases: mx.array | kquants.Narrowing,
                         bits: int | None) -> mx.array | None:
    """Whether each of a layer's biases is its scale times -2^(bits - 1), exactly (unevaluated: evaluated with the
    conversion that makes them, and read by `take_derived_biases`), for a layer that loading will quantize (`module`
    as built: our Linear or Embedding, `bits` per code); None where its biases are held anyway (other modules, Metal,
    as `drop_derived_biases`). `scales` and `biases` in any float dtype that holds their values; biases that are made
    from the scales by construction (`kquants.Narrowing.from_scales`) are checked from the scales alone, never made."""
    if _ON_METAL or bits is None or type(module) not in (Linear, Embedding):
        return None
    if isinstance(biases, kquants.Narrowing):
        if biases.from_scales is not None:
            return biases.from_scales
        biases = biases.wide
    return _derived(scales, biases, bits)


def take_derived_biases(tensors: dict[str, mx.array], layer: str, check: mx.array, bits: int) -> int | None:
    """Called as a checkpoint's tensors are read into `tensors` (the layer's scales and biases among them, in their
    dtypes): when `check` (`derived_biases_check`) holds and they share a dtype, so that each bias is its scale times
    -2^(bits - 1) exactly in their dtype (`drop_derived_biases`), the biases leave `tensors` and the factor is
    returned, for `made_from_scales` once the layer is built: a load never holds them (SmolLM2's Q4_K_M: 7.4 MB at
    its peak)."""
    if tensors[f"{layer}.scales"].dtype != tensors[f"{layer}.biases"].dtype or not check.item():
        return None
    del tensors[f"{layer}.biases"]
    return _bias_per_scale(bits)


def made_from_scales(model: nn.Module, factors: dict[str, int]) -> None:
    """The quantized layers named in `factors` (`take_derived_biases`) make their biases from their scales."""
    modules = dict(model.named_modules())
    for layer, factor in factors.items():
        m = modules[layer]
        m.bias_per_scale = factor
        del m.biases


def _bias_per_scale(bits: int) -> int:
    return -(1 << (bits - 1))


def _derived(scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """Whether every bias is its scale times -2^(bits - 1), exactly (unevaluated). In float32: exact, a power of two
    times a float16 that a float16 bias equals."""
    return mx.array_equal(scales.astype(mx.float32) * _bias_per_scale(bits), biases.astype(mx.float32))


def drop_derived_biases(model: nn.Module) -> None:
    """Drops the biases of affine layers (ours) where each is its scale times -2^(bits - 1) (codes offset by half
    their range: GGUF's Q4_0, Q5_0 and Q8_0 in MLX's form), exactly so in their dtype; each product makes them
    again from the scales (one small multiplication), bit for bit. 2 bytes of every 20-36 per 32 weights. Off Metal
    (an inference-only layout, as `cpu_layout`'s), on evaluated weights."""
    if _ON_METAL:
        return
    layers = [m for _, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
              and m.mode == "affine" and "biases" in m and m["biases"].dtype == m["scales"].dtype]
    # a few layers per evaluation, dropping as it goes: the float32 copies the check makes stay about
    # `kquants.SLICE_BYTES` on top of the weights (all layers in one evaluation: 7 MB for SmolLM2's Q4_K_M)
    group: list[nn.Module] = []
    for i, m in enumerate(layers):
        group.append(m)
        if i == len(layers) - 1 or 4 * sum(g["scales"].size for g in group) >= kquants.SLICE_BYTES:
            _drop_if_derived(group)
            group = []


def _drop_if_derived(layers: list[nn.Module]) -> None:
    # in float32 (exact: a power of two times a float16 that a float16 bias equals), the layers in one evaluation
    derived = [_derived(m["scales"], m["biases"], m.bits) for m in layers]
    mx.eval(derived)
    for m, same in zip(layers, derived, strict=True):
        if same.item():
            m.bias_per_scale = _bias_per_scale(m.bits)
            del m.biases


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear with a faster CPU path for prompts (`_quantized_matmul`) and biases that may be made from
    its scales (`drop_derived_biases`)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class Embedding(nn.Embedding):
    """nn.Embedding whose quantized form has the faster CPU path for prompts when it doubles as the output head."""

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def __call__(self, ids: mx.array) -> mx.array:
        return mx.dequantize(self["weight"][ids], self["scales"][ids], _biases(self, ids), group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_matmul(self, x)


class BlockLinear(nn.Module):
    """A linear layer whose weight stays in GGML blocks as the GGUF file stores it (`mlxq.kernels.kquants`):
    `weight` uint8 [out, row bytes] of type `kind`, multiplied by the kquants kernels (the reference
    dequantizes one layer at a time, at call time). With `input_order`, the weight's columns hold the input's
    features in that order (a column permutation its blocks could not absorb), so the input is gathered first."""

    def __init__(self, dim_in: int, dim_out: int, kind: str, bias: bool = False, input_order: bool = False):
        super().__init__()
        self.kind = kind
        self.weight = mx.zeros((dim_out, kquants.row_bytes(kind, dim_in)), mx.uint8)
        if bias:
            self.bias = mx.zeros((dim_out,))
        if input_order:
            self.input_order = mx.arange(dim_in, dtype=mx.int32)

    def __call__(self, x: mx.array) -> mx.array:
        if "input_order" in self:
            x = mx.take(x, self["input_order"], axis=-1)
        y = kquants.matmul(x, self["weight"], self.kind)
        return y + self["bias"] if "bias" in self else y


class BlockEmbedding(nn.Module):
    """An embedding table in GGML blocks: a lookup dequantizes only the rows it reads; `as_linear` (tied output
    heads) multiplies on the blocks."""

    def __init__(self, num_embeddings: int, dims: int, kind: str, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.kind, self.dtype = kind, dtype
        self.weight = mx.zeros((num_embeddings, kquants.row_bytes(kind, dims)), mx.uint8)

    def __call__(self, ids: mx.array) -> mx.array:
        return kquants.take_rows(self["weight"], self.kind, ids, self.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return kquants.matmul(x, self["weight"], self.kind)


def to_blocks(module: nn.Module, kind: str, dtype: mx.Dtype, input_order: bool = False) -> nn.Module:
    """The block-quantized counterpart of a Linear / Embedding / SwitchLinear, same shapes (GGUF weights of a type
    MLX's affine format cannot hold exactly)."""
    from mlxq.models.moe import BlockSwitchLinear, SwitchLinear

    if isinstance(module, SwitchLinear):
        n_experts, dim_out, dim_in = module.weight.shape
        return BlockSwitchLinear(dim_in, dim_out, n_experts, kind)
    if isinstance(module, nn.Embedding):
        return BlockEmbedding(*module.weight.shape, kind, dtype)
    if isinstance(module, nn.Linear):
        dim_out, dim_in = module.weight.shape
        return BlockLinear(dim_in, dim_out, kind, bias="bias" in module, input_order=input_order)
    raise ConfigError(f"a {type(module).__name__} cannot hold GGML {kind} blocks")


def cpu_layout(model: nn.Module) -> None:
    """Off Metal, put every module with an inference-only weight layout (`transpose_weight`, `cpu_layout`) into
    it; on Metal the fused kernels want the checkpoint layout. Call after `fuse()`, which concatenates weights."""
    if _ON_METAL:
        return
    for _, module in model.named_modules():
        if hasattr(module, "transpose_weight"):
            module.transpose_weight()
        elif hasattr(module, "cpu_layout"):
            module.cpu_layout()


class TernaryLinear(nn.Module):
    """A linear layer with ternary weights: codes packed as `mlxq.kernels.ternary` lays them out ("tq2" or "tq1"),
    `scales` per output channel [out] or per tensor [1], and optionally BitNet's int8 activations
    (`act_bits=8`: each token rounded to int8 on its absmax before the product, as BitLinear does)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = False, *, packing: str = "tq2",
                 per_tensor: bool = False, act_bits: int | None = None):
        super().__init__()
        self.dim_in, self.packing, self.act_bits = dim_in, packing, act_bits
        self.weight = mx.zeros((dim_out, ternary.packed_width(dim_in, packing)), mx.uint8)
        self.scales = mx.ones((1 if per_tensor else dim_out,))
        if bias:
            self.bias = mx.zeros((dim_out,))

    def cpu_layout(self) -> None:
        """Off Metal, tq1 codes are re-packed as tq2 once: MLX's CPU 2-bit matmul reads tq2 bytes as they are,
        while tq1 is re-packed into 2-bit words per call (bench/kernels.py: one token about 1.5-2x tq2's time).
        25 % more memory for the codes, CPU only."""
        if self.packing == "tq1":
            self.weight = ternary.pack(ternary.unpack(self["weight"], self.dim_in, "tq1"), "tq2")
            self.packing = "tq2"

    def __call__(self, x: mx.array) -> mx.array:
        w = ternary.TernaryWeight(self["weight"], self["scales"], self.dim_in, self.packing)
        if self.act_bits == 8:
            xq, scale = ternary.quantize_activations(x)
            y = ternary.ternary_matmul(xq, w, scale).astype(x.dtype)
        else:
            y = ternary.ternary_matmul(x, w)
        return y + self["bias"] if "bias" in self else y


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the given layers' outputs concatenated (one matmul instead of several:
    fewer, larger reads of the same input), or None when they cannot share one (mixed quantization)."""
    first = linears[0]
    if any(type(m) is not type(first) for m in linears) or not isinstance(
            first, (nn.Linear, nn.QuantizedLinear, BlockLinear)):
        return None
    if len({_layout(m) for m in linears}) > 1 or any("input_order" in m for m in linears):
        return None
    fused = copy.copy(first)  # same class and settings; the arrays are replaced below
    for key in ("weight", "scales", "bias"):
        if key in first:
            fused[key] = joined_rows([m[key] for m in linears])  # read as one (`kernels.rows`): not copied
    if any("biases" in m for m in linears):  # held by some: those made from their scales are made here, as stored
        fused["biases"] = joined_rows([m["biases"] if "biases" in m else m["scales"] * m.bias_per_scale
                                       for m in linears])
    return fused


def _layout(m: nn.Module) -> tuple:
    """What must agree for layers to share one weight: quantization settings and whether there is a bias."""
    return (getattr(m, "group_size", None), getattr(m, "bits", None), getattr(m, "mode", None),
            getattr(m, "kind", None), "bias" in m)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """Scaled dot-product attention, q [B, H, L, D] against GQA k/v [B, Hk, T, D].

    For a single query (decode) off Metal, grouping the query heads per KV head and doing two plain
    matmuls beats MLX's CPU fallback (a few percent of a decode step); everything else uses mx.fast.
    """
    B, H, L, D = q.shape
    if L != 1 or _ON_METAL or isinstance(mask, str):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    Hk = k.shape[1]
    scores = (q * scale).reshape(B, Hk, H // Hk, D) @ k.swapaxes(-1, -2)
    if mask is not None:  # [.., 1, T] with one query: broadcasts over the grouped heads as it is
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    return (weights @ v).reshape(B, H, L, v.shape[-1])


class Attention(nn.Module):
    """GQA attention, optional q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3) and an RMSNorm on the
    heads' output before o_proj (BitNet's attn_sub_norm). `linear` builds the projections (BitNet: ternary)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope: RoPE,
        *,
        bias: bool = False,
        out_bias: bool = False,
        qk_norm_eps: float | None = None,
        scale: float | None = None,
        norm_cls: type[nn.Module] = nn.RMSNorm,
        sub_norm_eps: float | None = None,
        linear=None,
    ):
        super().__init__()
        linear = linear or Linear
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.q_proj = linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = linear(n_heads * head_dim, dim, bias=out_bias)
        if qk_norm_eps is not None:
            self.q_norm = norm_cls(head_dim, eps=qk_norm_eps)
            self.k_norm = norm_cls(head_dim, eps=qk_norm_eps)
        if sub_norm_eps is not None:
            self.attn_sub_norm = nn.RMSNorm(n_heads * head_dim, eps=sub_norm_eps)
        self.rope = rope

    def fuse(self) -> None:
        """Merge q/k/v into one projection after the weights are loaded (HF names stay the load format)."""
        if (fused := fuse_linears([self.q_proj, self.k_proj, self.v_proj])) is not None:
            self.qkv_proj = fused
            self._split = [self.n_heads * self.head_dim, (self.n_heads + self.n_kv_heads) * self.head_dim]
            del self.q_proj, self.k_proj, self.v_proj

    def __call__(self, x: mx.array, cache) -> mx.array:
        B, L, _ = x.shape
        if "qkv_proj" in self:
            q, k, v = mx.split(self.qkv_proj(x), self._split, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        mask = cache.make_mask(L)
        q, k = self.rope(q, offset=cache.offset), self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask).transpose(0, 2, 1, 3).reshape(B, L, -1)
        if "attn_sub_norm" in self:
            out = self.attn_sub_norm(out)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for Llama/Qwen, GeGLU (tanh) for Gemma, ReLU² with an RMSNorm before
    down (ffn_sub_norm) for BitNet. `linear` builds the projections (BitNet: ternary)."""

    def __init__(self, dim: int, hidden: int, act=nn.silu, bias: bool = False, sub_norm_eps: float | None = None,
                 linear=None):
        super().__init__()
        linear = linear or Linear
        self.gate_proj = linear(dim, hidden, bias=bias)
        self.up_proj = linear(dim, hidden, bias=bias)
        self.down_proj = linear(hidden, dim, bias=bias)
        if sub_norm_eps is not None:
            self.ffn_sub_norm = nn.RMSNorm(hidden, eps=sub_norm_eps)
        self.act = act

    def fuse(self) -> None:
        if (fused := fuse_linears([self.gate_proj, self.up_proj])) is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        h = _glu(self.act, gate, up)
        return self.down_proj(self.ffn_sub_norm(h) if "ffn_sub_norm" in self else h)


def relu2(x: mx.array) -> mx.array:
    """ReLU squared (BitNet b1.58's activation)."""
    return mx.square(nn.relu(x))



@partial(mx.compile, shapeless=True)
def _silu_glu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@partial(mx.compile, shapeless=True)
def _gelu_glu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


def _glu(act, gate: mx.array, up: mx.array) -> mx.array:
    fused = {nn.silu: _silu_glu, nn.gelu_approx: _gelu_glu}.get(act)
    return fused(gate, up) if fused else act(gate) * up
