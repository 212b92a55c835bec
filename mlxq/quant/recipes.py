"""Recipes: which precision each tensor role gets. Data, not code: a recipe is a default plus per-role rules,
some limited to certain layers or model shapes (llama.cpp's K-quant mixes give more bits to the first
layers' attn_v and ffn_down, and to attn_v when many query heads share one KV head).

A precision is an int (affine bits, mlx-lm's format), "float" (kept unquantized) or "ternary" (BitNet
absmean, stored in mlxq's ternary packing); for GGUF export it is a GGUF type name ("Q4_K", "Q8_0", "F16", ...),
and llama.cpp's own mixes (Q4_K_M, Q3_K_M, Q2_K, ...) are recipes over the same roles (`GGUF_RECIPES`). Floors are
applied last and win over every recipe and user override: routers, gates, SSM state and conv never go below 8
bits, norms are never quantized.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from mlxq.errors import InvalidRequest
from mlxq.quant.roles import GROUPS, ROLE_GROUPS, ROLES, expand

Precision = int | str  # 2..8, "float", "ternary", or a GGUF type name

BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization packs
GROUP_SIZES = (32, 64, 128)
GGUF_FLOATS = ("F32", "F16", "BF16")  # GGUF types that store floats (a recipe's "float" picks one of these)


def _gguf_bpw(kind: str) -> float | None:
    """Bits per weight of a GGUF block type, None for anything else."""
    from mlxq.formats.gguf.codecs import TYPES, bits_per_weight

    return bits_per_weight(kind) if isinstance(kind, str) and kind in TYPES else None


@dataclass(frozen=True)
class Spec:
    """How one tensor is stored."""

    precision: Precision
    group_size: int = 64

    @property
    def quantized(self) -> bool:
        return self.precision != "float" and self.precision not in GGUF_FLOATS

    @property
    def gguf(self) -> bool:
        return _gguf_bpw(self.precision) is not None

    @property
    def bits(self) -> int:
        return 2 if self.precision == "ternary" else int(self.precision)

    @property
    def bpw(self) -> float:
        """Bits per weight including the fp16 scale and bias of each group (ternary: 2-bit codes, one scale a row)."""
        if self.precision == "ternary":
            return 2.0
        return self.bits + 32 / self.group_size if self.quantized else 16.0


FLOAT = Spec("float")


@dataclass(frozen=True)
class Where:
    """What a rule may look at besides the role: the tensor's layer and the model's shape."""

    layer: int | None = None  # None for global tensors (embeddings, head, MTP)
    n_layers: int = 1
    gqa: int = 1  # query heads per KV head
    mtp: bool = False  # inside a multi-token-prediction block
    experts: int = 0  # routed experts per MoE layer (0: dense)


# Rule conditions, as in llama.cpp's llama_tensor_get_type (use_more_bits and friends).
WHEN: dict[str, Callable[[Where], bool]] = {
    "all": lambda w: True,
    "first_2": lambda w: w.layer is not None and w.layer < 2,
    "first_16th": lambda w: w.layer is not None and w.layer < w.n_layers // 16,
    "more_bits": lambda w: (
        w.layer is not None
        and (w.layer < w.n_layers // 8 or w.layer >= 7 * w.n_layers // 8 or (w.layer - w.n_layers // 8) % 3 == 2)
    ),
    "first_4": lambda w: w.layer is not None and w.layer < 4,
    "first_8th": lambda w: w.layer is not None and w.layer < w.n_layers // 8,
    "gqa>=4": lambda w: w.gqa >= 4,
    "experts==8": lambda w: w.experts == 8,  # llama.cpp special-cases 8-expert models (Mixtral)
}

# Never below these, whatever the recipe or the user says: None means kept in float.
FLOORS: dict[str, int | None] = {
    "router": 8,
    "shared_expert_gate": 8,
    "deltanet_a": 8,
    "deltanet_b": 8,
    "deltanet_ba": 8,
    "ssm_a": None,
    "ssm_dt": None,
    "conv1d": None,
    "norm": None,
    "rope": None,
    "vision": None,
}


@dataclass(frozen=True)
class Recipe:
    name: str
    default: Precision
    rules: tuple[tuple[str, Precision, str], ...] = ()  # (role or group, precision, WHEN key); later rules win
    group_size: int = 64
    about: str = ""
    overrides: dict[str, Precision] = field(default_factory=dict)  # the user's per-role choices (win over rules)
    warning: str | None = None  # printed loudly, once, when the recipe is used

    def spec(self, role: str, where: Where = Where(), alias: str | None = None) -> Spec:
        """The spec for a tensor of `role`; rules and overrides naming `alias` apply too (a tied embedding is
        the head, and a user's `embedding=8` must still reach it)."""
        keys = {role, *ROLE_GROUPS.get(role, ()), *(("mtp",) if where.mtp else ())}
        if alias:
            keys |= {alias, *ROLE_GROUPS.get(alias, ())}
        precision = self.default
        for key, value, when in self.rules:
            if key in keys and WHEN[when](where):
                precision = value
        for key, value in self.overrides.items():
            if key in keys:
                precision = value
        return floored(role, Spec(precision, self.group_size))


def floored(role: str, spec: Spec) -> Spec:
    """`spec` raised to the role's floor (router, gates, SSM state, conv, norms)."""
    if role not in FLOORS:
        return spec
    floor = FLOORS[role]
    if floor is None or not spec.quantized:
        return FLOAT
    if spec.gguf:
        return spec if _gguf_bpw(spec.precision) >= floor else Spec("Q8_0")
    if spec.precision == "ternary" or spec.bits < floor:
        return Spec(floor, spec.group_size)
    return spec


TERNARY_WARNING = (
    "TERNARY: weights are rounded to {-1, 0, +1} x one scale per output channel. A model that was not trained "
    "ternary (BitNet b1.58) collapses under this: expect garbage output (llama.cpp issue 15193 shows the same "
    "with TQ1_0/TQ2_0 on ordinary models). Use it only for BitNet-style checkpoints."
)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "experts-2bit",
            8,
            (("experts", 2, "all"),),
            about="routed experts 2-bit, everything else 8-bit (flash-moe's configuration)",
        ),
        # llama.cpp Q3_K_M on MLX affine at group 64 (Q3_K 3.44 bpw ~ 3-bit 3.5; Q4_K ~ 4; Q5_K ~ 5; Q6_K ~ 6)
        Recipe(
            "q3_k_m",
            3,
            (
                ("attn_v_like", 4, "all"),
                ("attn_v_like", 5, "first_2"),
                ("attn_o", 4, "all"),
                ("ffn_down", 4, "all"),
                ("ffn_down", 5, "first_16th"),
                ("lm_head", 6, "all"),
            ),
            about="like llama.cpp Q3_K_M: 3-bit; attn_v 4-5, attn_output 4, ffn_down 4-5, output 6",
        ),
        # 2 bits where a bit buys the least, read off each role's measured cost on SmolLM2 (that role alone rounded
        # to nearest, KL on calibration text; per million weights, from 2 to 3 bits): ffn_gate 0.018, attn_q 0.028
        # and attn_output 0.029 stay at 2; ffn_down 0.035, ffn_up 0.046 and attn_k 0.095 get 3; attn_v (0.154, and
        # 0.029 again from 3 to 4) gets 4. The output head gets 4: from 4 to 6 bits would buy about a tenth of what
        # 2 -> 3 buys on any role, and a tied head is a fifth of a small model. llama.cpp's Q2_K placement (ffn_up
        # and attn_k at 2, attn_output 3, output 6) gave KL 1.405 at 3.638 bpw there, with more bits than this.
        # Measured on dense layers: routed experts and fused or DeltaNet projections keep llama.cpp's Q2_K rules.
        Recipe(
            "q2_k",
            2,
            (
                ("attn_k", 3, "all"),
                ("attn_v_like", 3, "all"),
                ("attn_v_like", 4, "gqa>=4"),
                ("attn_v", 4, "all"),
                ("mlp_up", 3, "all"),
                ("ffn_down", 3, "all"),
                ("lm_head", 4, "all"),
            ),
            about="2-bit, with bits where measured sensitivity is: attn_k, ffn_up, ffn_down 3; attn_v 4; output 4",
        ),
        Recipe(
            "ternary",
            "ternary",
            (("embeddings", 8, "all"),),
            about="BitNet-style absmean ternary weights; only for models trained ternary",
            warning=TERNARY_WARNING,
        ),
    ]
}


def _mix(name: str, default: str, *rules: tuple[str, Precision, str], about: str = "") -> Recipe:
    """One of llama.cpp's file types (llama_tensor_get_type): `default` for every quantizable tensor, the output
    head (and a tied embedding) in Q6_K unless the mix is Q8_0 or float, and the mix's own rules."""
    head = () if default in ("Q8_0", *GGUF_FLOATS) else (("lm_head", "Q6_K", "all"),)  # last: a tied embedding
    return Recipe(name, default, (*rules, *head), about=about or f"llama.cpp's {name}")  # is the head


def _pure(kind: str) -> Recipe:
    """Every quantizable tensor in one K-quant (llama-quantize --pure; llama.cpp has no file type of this name)."""
    return Recipe(kind, kind, about=f"{kind} for every quantizable tensor (llama-quantize --pure)")


_MOE8_ATTN = (("attn_v_like", "Q8_0", "experts==8"), ("attn_k", "Q8_0", "experts==8"))
_MOE8_ATTN_O = (("attn_o", "Q5_K", "experts==8"),)

# llama.cpp's mixes as recipes over mlxq's roles: the rules restate llama_tensor_get_type_impl for non-Falcon
# models (its attention-v counter is the layer index here: one attn_v-like tensor per layer, attn_v or the
# DeltaNet attn_qkv). Rows whose width is not a multiple of a type's block fall back at export, as llama.cpp's do.
GGUF_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        _mix("F32", "F32", about="float32"),
        _mix("F16", "F16", about="float16 (1-D tensors float32)"),
        _mix("BF16", "BF16", about="bfloat16 (1-D tensors float32)"),
        _mix("Q8_0", "Q8_0"),
        _mix("Q6_K", "Q6_K"),
        _pure("Q5_K"),
        _mix("Q5_1", "Q5_1"),
        _mix("Q5_0", "Q5_0"),
        _pure("Q4_K"),
        _mix("Q4_1", "Q4_1"),
        _mix("Q4_0", "Q4_0"),
        _pure("Q3_K"),
        _mix("TQ2_0", "TQ2_0", ("embedding", "Q4_K", "all"), about="ternary 2.06 bpw (BitNet-trained models only)"),
        _mix("TQ1_0", "TQ1_0", ("embedding", "Q4_K", "all"), about="ternary 1.69 bpw (BitNet-trained models only)"),
        _mix("Q5_K_M", "Q5_K", ("attn_v_like", "Q6_K", "more_bits"), ("ffn_down", "Q6_K", "more_bits")),
        _mix("Q5_K_S", "Q5_K"),
        _mix("Q4_K_M", "Q4_K", ("attn_v_like", "Q6_K", "more_bits"), ("ffn_down", "Q6_K", "more_bits"),
             *_MOE8_ATTN, *_MOE8_ATTN_O),
        _mix("Q4_K_S", "Q4_K", ("attn_v_like", "Q5_K", "first_4"), ("ffn_down", "Q5_K", "first_8th"),
             *_MOE8_ATTN, *_MOE8_ATTN_O),
        _mix("Q3_K_L", "Q3_K", ("attn_v_like", "Q5_K", "all"), ("ffn_down", "Q5_K", "all"),
             ("attn_o", "Q5_K", "all"), *_MOE8_ATTN),
        _mix("Q3_K_M", "Q3_K", ("attn_v_like", "Q4_K", "all"), ("attn_v_like", "Q5_K", "first_2"),
             ("ffn_down", "Q4_K", "all"), ("ffn_down", "Q5_K", "first_16th"), ("attn_o", "Q4_K", "all"),
             *_MOE8_ATTN, *_MOE8_ATTN_O),
        _mix("Q3_K_S", "Q3_K", *_MOE8_ATTN, *_MOE8_ATTN_O),
        _mix("Q2_K", "Q2_K", ("attn_v_like", "Q3_K", "all"), ("attn_v_like", "Q4_K", "gqa>=4"),
             ("ffn_down", "Q3_K", "all"), ("attn_o", "Q3_K", "all"), *_MOE8_ATTN, *_MOE8_ATTN_O),
    ]
}


def gguf_recipe(name: str, overrides: dict[str, Precision] | None = None) -> Recipe:
    """A GGUF export recipe (a type or one of llama.cpp's mixes) with the user's per-role types checked."""
    key = name.upper()
    if key not in GGUF_RECIPES:
        raise InvalidRequest(f"--type {name}: unknown (known: {', '.join(GGUF_RECIPES)})")
    recipe = GGUF_RECIPES[key]
    types = [t for t in GGUF_RECIPES if _gguf_bpw(t) is not None]
    checked = _checked(overrides, lambda v: v == "float" or _gguf_bpw(v) is not None,
                       f"a GGUF type ({', '.join(types)}) or float")
    return Recipe(recipe.name, recipe.default, recipe.rules, recipe.group_size, recipe.about,
                  {**recipe.overrides, **checked}, recipe.warning)


def uniform(bits: int, group_size: int = 64) -> Recipe:
    if bits not in BITS:
        raise InvalidRequest(f"--bits {bits}: MLX affine quantization packs {', '.join(map(str, BITS))} bits")
    return Recipe(f"{bits}bit", bits, group_size=group_size, about=f"uniform {bits}-bit, group {group_size}")


def make_recipe(
    name: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    overrides: dict[str, Precision] | None = None,
) -> Recipe:
    """A recipe by name or uniform bits, with the user's per-role overrides checked against known roles."""
    if name and bits:
        raise InvalidRequest("give either --bits or --recipe, not both")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise InvalidRequest(f"--group-size {group_size}: must be one of {', '.join(map(str, GROUP_SIZES))}")
    if name:
        if name not in RECIPES:
            raise InvalidRequest(f"--recipe {name}: unknown (known: {', '.join(RECIPES)})")
        recipe = RECIPES[name]
    else:
        recipe = uniform(bits or 4, group_size or 64)
    bits_text = ", ".join(map(str, BITS))
    checked = _checked(overrides, lambda v: v in ("float", "ternary") or v in BITS,
                       f"one of {bits_text}, float or ternary")
    return Recipe(
        recipe.name,
        recipe.default,
        recipe.rules,
        group_size or recipe.group_size,
        recipe.about,
        {**recipe.overrides, **checked},
        recipe.warning,
    )


def _checked(overrides: dict[str, Precision] | None, allowed: Callable[[Precision], bool], what: str) -> dict:
    """The user's per-role overrides, each naming a known role or group and an allowed precision; says which
    roles the floors will keep higher."""
    checked: dict[str, Precision] = {}
    for key, value in (overrides or {}).items():
        try:
            roles = expand(key)
        except KeyError:
            raise InvalidRequest(
                f"--set {key}={value}: '{key}' is not a role or group "
                f"(roles: {', '.join(ROLES)}; groups: {', '.join(GROUPS)})"
            ) from None
        if not allowed(value):
            raise InvalidRequest(f"--set {key}={value}: precision must be {what}")
        clamped = sorted(r for r in roles if floored(r, Spec(value)) != Spec(value))
        if clamped:
            print(f"mlxq: --set {key}={value}: {', '.join(clamped)} kept at their floor (8 bits or float)",
                  file=sys.stderr)
        checked[key] = value
    return checked


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, Precision]:
    """`ROLE=BITS` strings (CLI --set) -> {role: precision}."""
    out: dict[str, Precision] = {}
    for item in items:
        key, sep, value = item.partition("=")
        value = value.strip()
        if not sep or not key.strip():
            raise InvalidRequest(f"--set {item}: expected ROLE=BITS (e.g. attn_v=6, experts=2, embedding=float)")
        if value in ("float", "ternary"):
            out[key.strip()] = value
            continue
        if _gguf_bpw(value.upper()) is not None:  # a GGUF type (mlxq export)
            out[key.strip()] = value.upper()
            continue
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise InvalidRequest(
                f"--set {item}: precision must be a number of bits, float, ternary or a GGUF type"
            ) from None
    return out
