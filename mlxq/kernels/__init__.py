"""Custom kernels: pure-MLX reference paths (every backend) and, where registered, Metal / CUDA twins."""

from mlxq.kernels.deltanet import backends, gated_delta_rule, register_backend

__all__ = ["backends", "gated_delta_rule", "register_backend"]
