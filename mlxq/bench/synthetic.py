"""Synthetic checkpoints of a chosen shape: random weights and a character-level tokenizer, written tensor by
tensor. Measuring expert streaming needs a MoE several times bigger than the memory budget, with a real model's
proportions, without downloading hundreds of gigabytes.

The routed experts are written already quantized (an mlx-lm directory: random 2-bit codes, scales and biases),
so the source is no bigger than what `mlxq quantize` makes of it; every other tensor is float16. Tensor names
are mlx-lm's (stacked experts under `switch_mlp`), so mlx-lm loads what `mlxq quantize` writes from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxq.models import build_model
from mlxq.quant.writer import OutTensor, ShardWriter


@dataclass(frozen=True)
class MoEShape:
    """The shape of a Qwen3.5-MoE (hybrid: three Gated DeltaNet layers to one attention layer)."""

    layers: int
    hidden: int
    experts: int
    top_k: int
    moe_hidden: int
    shared_hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    linear_key_heads: int
    linear_value_heads: int
    linear_head_dim: int
    vocab: int

    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_hidden

    def config(self) -> dict:
        text = {
            "model_type": "qwen3_5_moe_text", "hidden_size": self.hidden, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "linear_num_key_heads": self.linear_key_heads,
            "linear_num_value_heads": self.linear_value_heads, "linear_key_head_dim": self.linear_head_dim,
            "linear_value_head_dim": self.linear_head_dim, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
            "num_experts": self.experts, "num_experts_per_tok": self.top_k,
            "moe_intermediate_size": self.moe_hidden, "shared_expert_intermediate_size": self.shared_hidden,
            "intermediate_size": self.moe_hidden, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "max_position_embeddings": 32768, "partial_rotary_factor": 0.25,
            "rope_theta": 1e7, "rope_parameters": {"rope_type": "default", "rope_theta": 1e7,
                                                   "partial_rotary_factor": 0.25},
            "eos_token_id": 2,
        }
        return {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                "text_config": text, "tie_word_embeddings": False, "eos_token_id": 2}


# Qwen3.5-397B-A17B (its config.json; flash-moe's README: 60 layers, 45 DeltaNet + 15 attention, 512 experts)
QWEN35_397B = MoEShape(layers=60, hidden=4096, experts=512, top_k=10, moe_hidden=1024, shared_hidden=1024, heads=32,
                       kv_heads=2, head_dim=256, linear_key_heads=16, linear_value_heads=64, linear_head_dim=128,
                       vocab=248320)


def scaled(shape: MoEShape, width: int, layers: int, experts: int, vocab: int = 256) -> MoEShape:
    """`shape` with every width divided by `width` (head counts too), `layers` layers and `experts` experts."""
    return replace(shape, layers=layers, hidden=shape.hidden // width, moe_hidden=shape.moe_hidden // width,
                   shared_hidden=shape.shared_hidden // width, heads=max(shape.heads // width, 2),
                   linear_key_heads=max(shape.linear_key_heads // width, 1),
                   linear_value_heads=max(shape.linear_value_heads // width, 2), experts=experts, vocab=vocab)


def write_moe(out: Path, shape: MoEShape, expert_bits: int = 2, group_size: int = 64, seed: int = 0) -> Path:
    """A random Qwen3.5-MoE checkpoint of `shape` in `out` (routed experts quantized, the rest float16)."""
    out.mkdir(parents=True)
    config = shape.config()
    model = build_model(config)  # its parameters give every tensor's name and shape
    tensors = []
    for name, p in tree_flatten(model.parameters()):
        if ".mlp.experts." in name:
            base = name.replace(".mlp.experts.", ".mlp.switch_mlp.").removesuffix(".weight")
            e, rows, cols = p.shape
            tensors += [OutTensor(f"{base}.weight", (e, rows, cols * expert_bits // 32), mx.uint32),
                        OutTensor(f"{base}.scales", (e, rows, cols // group_size), mx.float16),
                        OutTensor(f"{base}.biases", (e, rows, cols // group_size), mx.float16)]
        else:
            tensors.append(OutTensor(name, tuple(p.shape), mx.float32 if name.endswith("A_log") else mx.float16))
    writer = ShardWriter(out, tensors, shard_bytes=2 << 30)
    levels = 2**expert_bits - 1
    for i, t in enumerate(tensors):
        k = mx.random.key(seed * 100003 + i)
        if t.dtype == mx.uint32:
            a = mx.random.randint(0, 2**31, t.shape, key=k).astype(mx.uint32) * 2 + mx.random.randint(0, 2, t.shape)
        elif t.name.endswith(".scales"):  # weights in +-r (r = 1/sqrt(fan in), down_proj's scaled as outputs are)
            a = mx.full(t.shape, 2 * _range(t.name, shape) / levels, t.dtype)
        elif t.name.endswith(".biases"):
            a = mx.full(t.shape, -_range(t.name, shape), t.dtype)
        elif t.name.endswith(("norm.weight", "layernorm.weight")):
            a = mx.ones(t.shape, t.dtype)
        elif t.name.endswith("A_log"):
            a = mx.random.uniform(-1.0, 0.5, t.shape, key=k)
        elif t.name.endswith("dt_bias"):
            a = mx.zeros(t.shape, t.dtype)
        else:
            a = (mx.random.normal(t.shape, key=k) * _std(t.name, t.shape)).astype(t.dtype)
        writer.write(t.name, a.astype(t.dtype))
        mx.clear_cache()
    writer.close()
    config["quantization"] = config["quantization_config"] = {"group_size": group_size, "bits": expert_bits,
                                                              "mode": "affine"}
    config["mlxq_synthetic"] = asdict(shape)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    char_tokenizer(out, shape.vocab)
    return out


# Random deep networks forget their input: every token's hidden state drifts to the same direction, and then
# every token is routed to the same few experts (a cache would look perfect). Here each layer adds a small update
# to the residual stream (outputs scaled down), so a token's hidden state stays close to its own embedding and its
# routing follows the token: common tokens share experts, rare ones reach others, as in a real model.
_OUTPUT = ("o_proj.weight", "out_proj.weight", "down_proj.weight")
OUTPUT_SCALE = 0.05
ROUTER_SCALE = 4.0  # router logits spread over a few units: top-k decided, not a coin toss


def _std(name: str, shape: tuple[int, ...]) -> float:
    fan_in = shape[-1] if len(shape) > 1 else 1
    if "embed" in name:
        return 1.0
    if name.endswith("mlp.gate.weight"):
        return ROUTER_SCALE * fan_in**-0.5
    return fan_in**-0.5 * (OUTPUT_SCALE if name.endswith(_OUTPUT) else 1.0)


def _range(name: str, shape: MoEShape) -> float:
    fan_in = shape.moe_hidden if "down_proj" in name else shape.hidden
    return fan_in**-0.5 * (OUTPUT_SCALE if "down_proj" in name else 1.0)


def char_tokenizer(path: Path, vocab_size: int = 160) -> None:
    """A character-level tokenizer (printable ASCII and newline, padded with unused tokens to `vocab_size`) that
    mlx_lm.load and mlxq.load both accept."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(path)
    )


def bpe_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens (the last one "<|endoftext|>", special), so
    that a tiny model written to GGUF has the vocabulary llama.cpp needs to load it. Printable ASCII, space
    and newline come first, so that English calibration text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    first = [byte_char[b] for b in [10, *range(32, 127)]]
    base = (first + sorted(set(byte_char.values()) - set(first)))[: vocab_size - 11]
    merges = [(base[2 * i + 40], base[2 * i + 41]) for i in range(10)]  # llama.cpp refuses BPE without merges
    tokens = base + [a + b for a, b in merges]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if len(fast) != vocab_size:
        raise ValueError(f"a byte-level tokenizer has {len(fast)} tokens here, not {vocab_size} (at most 267)")
    fast.save_pretrained(path)
