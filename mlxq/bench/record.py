"""What every measurement records and starts from, for `mlxq bench` and the scripts under bench/ alike: the BLAS
MLX's CPU matmuls really use, machine facts, the stored float copy both sides of a comparison load, medians, and
results written whole."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

from mlxq.cli import OPENBLAS  # noqa: F401  (re-exported: what to preload on Linux)


def blas() -> dict:
    """The BLAS that MLX's CPU matmuls actually use in this process. "gpu" when MLX computes on a GPU,
    "accelerate" on macOS; on Linux the library that serves `cblas_sgemm` in the global symbol scope (where a
    preloaded OpenBLAS sits, ahead of the reference BLAS MLX's wheel bundles and loads privately), else MLX's own.
    `libraries`: every BLAS mapped into the process (numpy's bundled one among them), for the record."""
    import mlx.core as mx

    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))  # loads MLX's CPU libraries if nothing has yet
    libraries = []
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as maps:
            libraries = sorted({line.split()[-1] for line in maps if "blas" in line.rsplit("/", 1)[-1].lower()})
    if mx.default_device() == mx.gpu:
        return {"kind": "gpu", "libraries": libraries}
    if sys.platform == "darwin":
        return {"kind": "accelerate", "libraries": libraries}
    used = _global_provider("cblas_sgemm") or next((lib for lib in libraries if "mlx" in lib), "unknown")
    return {"kind": "openblas" if "openblas" in used else "reference", "used": used, "libraries": libraries}


def _global_provider(symbol: str) -> str | None:
    """The file of the library that provides `symbol` in the process's global scope (dladdr), if any."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p)
    except (OSError, AttributeError):
        return None
    info = DlInfo()
    if not process.dladdr(address, ctypes.byref(info)) or not info.fname:
        return None
    return os.path.realpath(info.fname.decode())


def machine() -> dict:
    import mlx.core as mx

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],  # the machine is shared: how busy it was
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "blas": blas(),
    }


def float_copy(model: str) -> Path:
    """`model`'s weights as a float32 HF directory with its tokenizer, made once in mlxq's cache (a GGUF's blocks
    dequantized): the stored weights every side of a comparison starts from."""
    import mlx.core as mx

    from mlxq.formats.fetch import cache_dir
    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import Recipe

    path = cache_dir() / "bench" / "weights" / f"{model.replace('/', '--')}-f32"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        quantize(model, path, Recipe("float", "float"), dtype=mx.float32, progress=False)  # appears whole
    return path


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else 0.0


def write_json(path: Path, result: dict) -> Path:
    """`result` as indented JSON at `path`, written through a temporary file (whole or not at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path
