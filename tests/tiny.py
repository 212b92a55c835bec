"""Tiny random transformers checkpoints for every dense family (fp32, seeded)."""

from __future__ import annotations

from pathlib import Path

from mlxq.bench.synthetic import bpe_tokenizer as save_tiny_tokenizer  # noqa: F401  (the tests' name for it)

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256}, rope_theta=50000.0)),
    "llama_tied_linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_theta=1e6)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=5, num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"])),
    # MoE: a dense MLP among the expert layers, unnormalised top-k weights (Qwen3-MoE's default)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=32, rope_theta=1e6, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        mlp_only_layers=[1])),
    "qwen3_moe_norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=32, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    # every 6th layer global: the only schedule a GGUF can state (llama.cpp fixes the period at 6)
    "gemma3_p6": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=5, num_hidden_layers=6,
        layer_types=["sliding_attention"] * 5 + ["full_attention"])),
}


# The hybrid (Qwen3.5) text config the hybrid tests share: three DeltaNet layers, one attention layer
HYBRID_TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                   linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                   max_position_embeddings=512)


def randomise_hybrid(model) -> None:
    """Every norm, gate bias and decay parameter of a Qwen3.5 / Qwen3-Next model randomised (their initial values
    are zeros and ones), so that a mishandled one shows in the logits."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name:
                continue
            if name.endswith("linear_attn.norm.weight"):
                p.normal_(1.0, 0.2)
            elif "norm" in name or name.endswith(("dt_bias", "bias")):
                p.normal_(0.0, 0.3)
            elif name.endswith("A_log"):
                p.uniform_(-2.0, 1.0)


# Rows of 256 weights, so that GGUF's K-quants (256-weight super-blocks) apply instead of falling back
WIDE = dict(hidden_size=256, intermediate_size=512, head_dim=64)


def make_tiny(family: str, path: Path, seed: int = 0, **overrides):
    """Builds, saves and returns the torch model (eval mode); `overrides` change the config (e.g. **WIDE)."""
    import torch
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms and biases, so a mishandled one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0 if family.startswith("gemma3") else 1.0, 0.2)
    model.save_pretrained(path)
    return model


def to_old_style_rope(path: Path) -> None:
    """Rewrite config.json from transformers-5 `rope_parameters` to `rope_theta` + `rope_scaling`, and a
    Qwen3-MoE's `num_local_experts` to the `num_experts` its real checkpoints carry (what mlx-lm 0.32 reads)."""
    import json

    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params
    (path / "config.json").write_text(json.dumps(cfg))
