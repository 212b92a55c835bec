"""mlxq: an MLX-native inference and quantization runtime."""

from mlxq.api import Model, load

__all__ = ["Model", "load"]
__version__ = "0.1.0"
