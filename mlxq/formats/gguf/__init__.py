"""GGUF (llama.cpp, Ollama): `reader` opens files as HF-named lazy tensors, `names` holds the GGUF <-> HF
conventions (architectures, metadata keys, tensor names, what the converter changed) as tables."""

from mlxq.formats.gguf.reader import AFFINE_TYPES, GROUP, open_gguf

__all__ = ["AFFINE_TYPES", "GROUP", "open_gguf"]
