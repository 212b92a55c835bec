"""llama.cpp itself (llama-cpp-python) on a GGUF file, in a child process: a bad file can abort llama.cpp, and an
abort must fail one test, not the test run.

    logits = llama_cpp_logits(path, tokens)        # [len(tokens), vocab] float32, one forward pass
    layers = llama_cpp_layers(path)                # {"n_layer": own blocks, "n_layer_nextn": MTP blocks} loaded
    tokens = llama_cpp_greedy(path, prompt, n)     # n greedy tokens after the prompt
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama

_defaults = llama_cpp.llama_cpp.llama_model_default_params


def _with_mtp():  # multi-token-prediction blocks loaded (and shape-checked), not skipped as unused
    params = _defaults()
    params.load_mtp = True
    return params


llama_cpp.llama_cpp.llama_model_default_params = _with_mtp
path, mode, tokens, n, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = Llama(model_path=path, n_ctx=max(64, len(tokens) + n + 8), n_batch=512, n_threads=2, logits_all=True,
            verbose=True, seed=0, type_k=0, type_v=0)  # float32 KV cache: the default F16 one costs 1e-3
if mode == "logits":
    llm.eval(tokens)
    np.save(out, np.array(llm.scores[: len(tokens)], dtype=np.float32))
elif mode == "layers":
    model = llm._model.model
    json.dump({"n_layer": llama_cpp.llama_model_n_layer(model),
               "n_layer_nextn": llama_cpp.llama_model_n_layer_nextn(model)}, open(out, "w"))
else:
    ids = list(tokens)
    llm.eval(ids)
    made = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        made.append(nxt)
        llm.eval([nxt])
    json.dump(made, open(out, "w"))
"""


def _why(done: subprocess.CompletedProcess) -> str:
    """The lines of llama.cpp's log that say what went wrong (its log is long)."""
    lines = (done.stderr or done.stdout).strip().splitlines()
    return "\n".join([ln for ln in lines if "error" in ln.lower() or "assert" in ln.lower()][-8:] or lines[-8:])


def _run(path: Path, mode: str, tokens: list[int], n: int, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"out{suffix}"
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path), mode, json.dumps(list(map(int, tokens))),
                               str(n), str(out)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not out.exists():
            tail = _why(done)
            raise AssertionError(f"llama.cpp could not run {path} (exit {done.returncode}):\n{tail}")
        return np.load(out) if suffix == ".npy" else json.loads(out.read_text())


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    return _run(path, "logits", tokens, 0, ".npy")


def llama_cpp_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    return _run(path, "greedy", prompt, n, ".json")


def llama_cpp_layers(path: Path) -> dict[str, int]:
    """The blocks llama.cpp loaded: {"n_layer": the model's own, "n_layer_nextn": its multi-token-prediction ones}."""
    return _run(path, "layers", [0], 0, ".json")


_QUANTIZE = r"""
import ctypes, sys
import numpy as np
import llama_cpp

src, dst, ftype, imatrix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[6]
pure, requantize = sys.argv[4] == "pure", sys.argv[5] == "1"
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.pure = pure
params.allow_requantize = requantize
params.nthread = 2
if imatrix != "-":
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in np.load(imatrix).items()}
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()  # ends with a null name
    for e, (name, a) in zip(entries, arrays.items()):
        e.name, e.data, e.size = name.encode(), a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size
    params.imatrix = entries
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
"""


def llama_cpp_quantize(src: Path, dst: Path, file_type: str, pure: bool = False, requantize: bool = False,
                       imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) on a GGUF: `file_type` is a llama_ftype name as gguf-py
    spells it (MOSTLY_Q4_K_M, ...); `pure` puts every tensor in its default type; `requantize` lets it start from
    quantized tensors (it dequantizes them first); `imatrix` maps GGUF tensor names to importance per input channel
    (what llama-imatrix would give it)."""
    import gguf

    ftype = int(gguf.LlamaFileType[file_type])
    with tempfile.TemporaryDirectory() as tmp:
        table = "-"
        if imatrix:
            table = str(Path(tmp) / "imatrix.npz")
            np.savez(table, **imatrix)
        done = subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(dst), str(ftype),
                               "pure" if pure else "-", str(int(requantize)), table],
                              capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not dst.exists():
        tail = _why(done)
        raise AssertionError(f"llama.cpp could not quantize {src} (exit {done.returncode}):\n{tail}")
