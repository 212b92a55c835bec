"""Recipes: which precision each tensor role gets. Data, not code: a recipe is a default plus per-role rules,
some limited to certain layers or model shapes (llama.cpp's K-quant mixes give more bits to the first
layers' attn_v and ffn_down, and to attn_v when many query heads share one KV head).

A precision is an int (affine bits, mlx-lm's format), "float" (kept unquantized) or "ternary" (BitNet
absmean, stored in mlxq's ternary packing). Floors are applied last and win over every recipe and user override:
routers, gates, SSM state and conv never go below 8 bits, norms are never quantized.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from mlxq.errors import InvalidRequest
from mlxq.quant.roles import GROUPS, ROLE_GROUPS, ROLES, expand

Precision = int | str  # 2..8, "float", "ternary"

BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization packs
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Spec:
    """How one tensor is stored."""

    precision: Precision
    group_size: int = 64

    @property
    def quantized(self) -> bool:
        return self.precision != "float"

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


# Rule conditions, as in llama.cpp's llama_tensor_get_type (use_more_bits and friends).
WHEN: dict[str, Callable[[Where], bool]] = {
    "all": lambda w: True,
    "first_2": lambda w: w.layer is not None and w.layer < 2,
    "first_16th": lambda w: w.layer is not None and w.layer < max(w.n_layers // 16, 1),
    "more_bits": lambda w: (
        w.layer is not None
        and (w.layer < w.n_layers // 8 or w.layer >= 7 * w.n_layers // 8 or (w.layer - w.n_layers // 8) % 3 == 2)
    ),
    "gqa>=4": lambda w: w.gqa >= 4,
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
        Recipe(
            "q2_k",
            2,
            (
                ("attn_v_like", 3, "all"),
                ("attn_v_like", 4, "gqa>=4"),
                ("attn_o", 3, "all"),
                ("ffn_down", 3, "all"),
                ("lm_head", 6, "all"),
            ),
            about="like llama.cpp Q2_K: 2-bit; attn_v 3-4, attn_output 3, ffn_down 3, output 6",
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
    checked: dict[str, Precision] = {}
    for key, value in (overrides or {}).items():
        try:
            roles = expand(key)
        except KeyError:
            raise InvalidRequest(
                f"--set {key}={value}: '{key}' is not a role or group "
                f"(roles: {', '.join(ROLES)}; groups: {', '.join(GROUPS)})"
            ) from None
        if value not in ("float", "ternary") and value not in BITS:
            raise InvalidRequest(
                f"--set {key}={value}: precision must be one of {', '.join(map(str, BITS))}, float or ternary"
            )
        clamped = sorted(r for r in roles if floored(r, Spec(value)) != Spec(value))
        if clamped:
            print(
                f"mlxq: --set {key}={value}: {', '.join(clamped)} kept at 8 bits or float (their floor)",
                file=sys.stderr,
            )
        checked[key] = value
    return Recipe(
        recipe.name,
        recipe.default,
        recipe.rules,
        group_size or recipe.group_size,
        recipe.about,
        {**recipe.overrides, **checked},
        recipe.warning,
    )


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
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise InvalidRequest(f"--set {item}: precision must be a number of bits, float or ternary") from None
    return out
