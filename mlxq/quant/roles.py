"""Tensor roles: what a tensor does in the network, from its name (HF, mlx-lm or GGUF/Ollama) and the
architecture. Recipes choose precision per role, so every tensor of every supported family must get one.

The table is data: an ordered list of (pattern, role), first match wins. Norms come first so that a norm
inside any block (MTP, experts, DeltaNet) is always a norm, and norms are never quantized. Tensors inside an
MTP block keep their functional role (its router stays a router, with the router's floor); `in_mtp` tells a
recipe that a tensor belongs to MTP, and the catch-all `mtp` role takes only what has no other meaning.
"""

from __future__ import annotations

import re

# role -> the groups it belongs to (a recipe or a user override may name a role or a group)
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "embedding": ("embeddings",),
    "lm_head": ("embeddings",),
    # attn_v_like / ffn_down / attn_o follow llama.cpp's tensor categories (K-quant mixes raise them)
    "attn_q": ("attention",),
    "attn_k": ("attention",),
    "attn_v": ("attention", "attn_v_like"),
    "attn_o": ("attention",),
    "attn_qkv": ("attention", "attn_v_like"),
    "mlp_gate": ("mlp",),
    "mlp_up": ("mlp",),
    "mlp_down": ("mlp", "ffn_down"),
    "expert_gate": ("experts",),
    "expert_up": ("experts",),
    "expert_down": ("experts", "ffn_down"),
    "shared_gate": ("shared_expert",),
    "shared_up": ("shared_expert",),
    "shared_down": ("shared_expert", "ffn_down"),
    "router": ("gates",),
    "shared_expert_gate": ("gates",),
    "deltanet_qkv": ("deltanet", "attn_v_like"),
    "deltanet_z": ("deltanet",),
    "deltanet_qkvz": ("deltanet",),
    "deltanet_a": ("deltanet", "gates"),
    "deltanet_b": ("deltanet", "gates"),
    "deltanet_ba": ("deltanet", "gates"),
    "deltanet_out": ("deltanet",),
    "ssm_a": ("ssm_state",),
    "ssm_dt": ("ssm_state",),
    "conv1d": ("ssm_state",),
    "norm": (),
    "mtp": (),  # MTP-only tensors (fc / eh_proj / shared head); MTP blocks' linears keep their own roles
    "vision": (),
    "rope": (),
}
ROLES = tuple(ROLE_GROUPS)
GROUPS = tuple(sorted({g for gs in ROLE_GROUPS.values() for g in gs}))

_P = r"(?:^|\.)"  # a name component starts here
_VISION = r"^(?:model\.)?(?:visual|vision_tower|vision_model|multi_modal_projector|mm)\.|^v\."

# First match wins. Patterns search the whole name, so HF (`model.layers.3.`), multimodal
# (`model.language_model.`), mlx-lm (`language_model.model.`, `switch_mlp`) and GGUF (`blk.3.`) prefixes all work.
ROLE_TABLE: list[tuple[str, str]] = [
    # norms (HF *_layernorm / *_norm / norm; GGUF *_norm, ssm_norm, nextn enorm/hnorm; Ollama variants)
    # (also MTP's pre_fc_norm_embedding / pre_fc_norm_hidden and nextn's shared_head_norm)
    (r"(?:norm|_layernorm|layer_norm|ln_\w+|enorm|hnorm)(?:_\w+)?(?:\.weight|\.bias)?$", "norm"),
    # vision towers / projectors (kept as they are: not part of the language model)
    (_VISION, "vision"),
    (r"(?:rotary_emb\.inv_freq|rope_freqs|attn_rot_embd)", "rope"),
    # embeddings and output head
    (_P + r"(?:embed_tokens|token_embd|wte|tok_embeddings)(?:\.weight|\.scales|\.biases)?$", "embedding"),
    (r"(?:^|\.)lm_head(?:\.weight|\.scales|\.biases)?$|^output(?:\.weight|\.scales|\.biases)?$", "lm_head"),
    # MoE: router, shared-expert gate, shared expert, routed experts (HF per-expert, HF fused 3-D, mlx-lm switch_mlp)
    (r"\.mlp\.gate(?:\.weight|\.scales|\.biases)?$|\.ffn_gate_inp(?:\.weight)?$|\.block_sparse_moe\.gate\.", "router"),
    (r"\.shared_expert_gate\.|\.ffn_gate_inp_shexp(?:\.weight)?$", "shared_expert_gate"),
    (r"\.shared_experts?\.gate_proj\.|\.ffn_gate_shexp\.", "shared_gate"),
    (r"\.shared_experts?\.up_proj\.|\.ffn_up_shexp\.", "shared_up"),
    (r"\.shared_experts?\.down_proj\.|\.ffn_down_shexp\.", "shared_down"),
    (r"\.(?:experts|switch_mlp)(?:\.\d+)?\.(?:gate_proj|w1)|\.ffn_gate_exps\.", "expert_gate"),
    (r"\.(?:experts|switch_mlp)(?:\.\d+)?\.(?:up_proj|w3)|\.ffn_up_exps\.", "expert_up"),
    (r"\.(?:experts|switch_mlp)(?:\.\d+)?\.(?:down_proj|w2)|\.ffn_down_exps\.", "expert_down"),
    (r"\.experts\.gate_up_proj$|\.ffn_gate_up_exps\.", "expert_gate"),
    # Gated DeltaNet (Qwen3.5 / Qwen3-Next); GGUF attn_qkv / attn_gate are DeltaNet only in hybrid archs (below)
    (r"\.linear_attn\.in_proj_qkvz\.|\.ssm_in\.", "deltanet_qkvz"),
    (r"\.linear_attn\.in_proj_qkv\.", "deltanet_qkv"),
    (r"\.linear_attn\.in_proj_z\.", "deltanet_z"),
    (r"\.linear_attn\.in_proj_ba\.|\.ssm_ba\.", "deltanet_ba"),
    (r"\.linear_attn\.in_proj_a\.|\.ssm_alpha\.", "deltanet_a"),
    (r"\.linear_attn\.in_proj_b\.|\.ssm_beta\.", "deltanet_b"),
    (r"\.linear_attn\.out_proj\.|\.ssm_out\.", "deltanet_out"),
    (r"\.A_log$|\.ssm_a(?:\.weight)?$", "ssm_a"),
    (r"\.dt_bias$|\.ssm_dt(?:\.bias|\.weight)?$|\.linear_attn\.dt_proj\.", "ssm_dt"),
    (r"\.conv1d\.|\.ssm_conv1d\.", "conv1d"),
    # attention
    (r"\.(?:self_attn|attention)\.(?:q_proj|wq)\.|\.attn_q\.", "attn_q"),
    (r"\.(?:self_attn|attention)\.(?:k_proj|wk)\.|\.attn_k\.", "attn_k"),
    (r"\.(?:self_attn|attention)\.(?:v_proj|wv)\.|\.attn_v\.", "attn_v"),
    (r"\.(?:self_attn|attention)\.(?:o_proj|wo|dense)\.|\.attn_output\.|\.attn_out\.", "attn_o"),
    (r"\.(?:self_attn|attention)\.(?:qkv_proj|query_key_value)\.|\.attn_qkv\.", "attn_qkv"),
    # dense MLP
    (r"\.(?:mlp|feed_forward)\.(?:gate_proj|w1)\.|\.ffn_gate\.", "mlp_gate"),
    (r"\.(?:mlp|feed_forward)\.(?:up_proj|w3)\.|\.ffn_up\.", "mlp_up"),
    (r"\.(?:mlp|feed_forward)\.(?:down_proj|w2)\.|\.ffn_down\.", "mlp_down"),
    # whatever else lives in a multi-token-prediction block (HF mtp.fc, GGUF nextn.eh_proj / shared_head_head)
    (r"(?:^|\.)mtp\.|\.nextn\.", "mtp"),
]

# GGUF names whose meaning depends on the architecture: in the hybrid Qwen families `attn_qkv` is the
# DeltaNet input projection and `attn_gate` its output gate z.
ARCH_ROLE_TABLE: dict[str, list[tuple[str, str]]] = {
    arch: [(r"^blk\.\d+\.attn_qkv\.", "deltanet_qkv"), (r"^blk\.\d+\.attn_gate\.", "deltanet_z")]
    for arch in (
        "qwen35",
        "qwen35moe",
        "qwen3next",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen3_5_text",
        "qwen3_5_moe_text",
        "qwen3_next",
    )
}

_COMPILED = [(re.compile(p), r) for p, r in ROLE_TABLE]
_COMPILED_ARCH = {a: [(re.compile(p), r) for p, r in t] for a, t in ARCH_ROLE_TABLE.items()}
_LAYER = re.compile(r"(?:layers|blk|h)\.(\d+)\.")


def role_of(name: str, arch: str | None = None) -> str | None:
    """The role of tensor `name` (None when no rule matches: the caller decides whether that is an error)."""
    for pattern, role in [*_COMPILED_ARCH.get(arch or "", []), *_COMPILED]:
        if pattern.search(name):
            return role
    return None


_MTP = re.compile(r"(?:^|\.)mtp\.|\.nextn\.")


def in_mtp(name: str) -> bool:
    """Whether a tensor belongs to a multi-token-prediction block (HF `mtp.*`, GGUF `blk.N.nextn.*`)."""
    return bool(_MTP.search(name))


def in_vision(name: str) -> bool:
    """Whether a tensor belongs to a vision tower or projector (its norms included)."""
    return bool(re.search(_VISION, name))


def layer_of(name: str) -> int | None:
    """The block index in a tensor name (`model.layers.3.` or `blk.3.`), or None for global tensors. MTP blocks
    count as global: their `mtp.layers.0` is not the network's first layer."""
    if in_mtp(name):
        return None
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def expand(key: str) -> tuple[str, ...]:
    """A role or a group name -> the roles it stands for. ("mtp" is both: as a recipe key it also matches
    every tensor inside an MTP block, see recipes.Where.)"""
    if key in ROLE_GROUPS:
        return (key,)
    roles = tuple(r for r, groups in ROLE_GROUPS.items() if key in groups)
    if not roles:
        raise KeyError(key)
    return roles
