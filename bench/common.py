"""What every benchmark shares: the common options, the BLAS check, machine facts, and the JSON result convention
(bench/results/NAME.json, also printed as the last stdout line).

    args = parse_args(parser)        # adds --quick and --allow-reference-blas, refuses reference BLAS off the GPU
    src = float_copy("smollm2")      # the stored weights both sides load
    ...
    write_result("NAME", {..., "ratios": {...}})
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the benchmark's options plus the shared ones. Off the GPU, MLX's CPU matmuls go through whatever
    BLAS the process loaded; MLX's Linux wheel bundles reference BLAS (about 40x slower), and a figure taken with
    it is not comparable with anything, so the run stops unless `--allow-reference-blas`."""
    parser.add_argument("--quick", action="store_true", help="a short run (about 2 minutes here)")
    parser.add_argument("--allow-reference-blas", action="store_true",
                        help="run even when MLX's CPU matmuls would use reference BLAS (figures not comparable)")
    args = parser.parse_args(argv)
    info = blas()
    if info["kind"] == "reference" and not args.allow_reference_blas:
        sys.exit(f"{parser.prog}: error: MLX runs on the CPU with reference BLAS ({', '.join(info['libraries'])}); "
                 f"preload OpenBLAS (LD_PRELOAD={OPENBLAS}) or pass --allow-reference-blas")
    return args


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


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def write_result(name: str, result: dict) -> dict:
    """Adds machine facts and a timestamp, writes bench/results/NAME.json (whole or not at all), prints it as the
    last stdout line."""
    result = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    sys.stdout.flush()
    print(json.dumps(result))
    return result


@contextlib.contextmanager
def stdout_to_stderr():
    """Python's and C's stdout (llama.cpp, peers' progress) onto stderr while a peer runs, so the result line stays
    the last line of stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
