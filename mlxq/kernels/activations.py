"""exp, sigmoid and silu that run at twice the speed off Metal.

MLX's CPU backend evaluates `exp` at about 17 ns an element but `2 ** x` at about 8, and on the CPU the
exps inside silu, sigmoid and the decay matrices are a third of a hybrid model's prefill. So off Metal,
exp(x) is computed as 2 ** (x log2 e): the rounding of x log2 e adds a relative error of about 6e-8 |x|
(1e-6 at |x| = 16, where silu and sigmoid have long saturated). On Metal the native ops are used.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

LOG2E = 1.4426950408889634
_ON_METAL = mx.metal.is_available()


def exp(x: mx.array) -> mx.array:
    return mx.exp(x) if _ON_METAL else mx.power(2.0, x * LOG2E)


@partial(mx.compile, shapeless=True)
def sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + exp(-x))


@partial(mx.compile, shapeless=True)
def silu(x: mx.array) -> mx.array:
    return x / (1.0 + exp(-x))


@partial(mx.compile, shapeless=True)
def silu_glu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the SwiGLU of an MLP, in one pass."""
    return gate / (1.0 + exp(-gate)) * up
