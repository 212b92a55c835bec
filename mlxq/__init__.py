"""mlxq: an MLX-native inference and quantization runtime."""

__all__ = ["Model", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `Model` and `load` on first use: importing a submodule (a spawned export worker needs only the codecs) does not
    # import the whole runtime (MLX, transformers: ~0.6 s)
    if name in __all__:
        from mlxq import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlxq' has no attribute '{name}'")
