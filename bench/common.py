"""What every benchmark shares: machine facts, repeated timing, and the JSON result convention
(bench/results/NAME.json, also printed as the last stdout line)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import mlx.core as mx

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "blas_preload": os.environ.get("LD_PRELOAD", ""),
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def write_result(name: str, result: dict) -> dict:
    """Adds machine info and a timestamp, writes bench/results/NAME.json, prints it as the last line."""
    result = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()
    print(json.dumps(result))
    return result


@contextlib.contextmanager
def stdout_to_stderr():
    """File descriptor 1 onto 2 while C code (llama.cpp) prints, so the result line stays the last line of stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
