"""The benchmark scripts' shared options and result convention (bench/results/NAME.json, NAME-quick.json for
--quick, also printed as the last stdout line). What they measure with and record lives in mlxq.bench, which
`mlxq bench` runs too.

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
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlxq.bench.record import OPENBLAS, blas, float_copy, machine, median, write_json  # noqa: F401  (re-exported)

RESULTS = Path(__file__).parent / "results"


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


def write_result(name: str, result: dict) -> dict:
    """Adds machine facts and a timestamp, writes bench/results/NAME.json (whole or not at all), prints it as the
    last stdout line. A quick run writes NAME-quick.json: it never replaces a recorded full run."""
    result = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    write_json(RESULTS / f"{name}-quick.json" if result.get("quick") else RESULTS / f"{name}.json", result)
    sys.stdout.flush()
    print(json.dumps(result))
    return result


def rounds_verdict(values: list[float], goal: Callable[[float], bool]) -> dict:
    """A ratio measured once per round (its settings interleaved within the round, so both sides saw the same load):
    the median over rounds, every round, and the goal's verdict at the median. `robust`: at least 3 rounds, and
    leaving out any one round gives the same verdict, so no single round on a shared machine decides it."""
    mid = median(values)
    met = goal(mid)
    left_out = [median(values[:i] + values[i + 1 :]) for i in range(len(values))]
    return {"median": round(mid, 3), "rounds": values, "min": min(values), "max": max(values), "goal_met": met,
            "rounds_meeting_goal": sum(map(goal, values)),
            "robust": len(values) >= 3 and all(goal(m) == met for m in left_out)}


@contextlib.contextmanager
def stdout_to_stderr():
    """Python's and C's stdout (file descriptor 1) onto stderr while a peer runs (llama.cpp, mlx-lm print), so the
    result line stays the last line of stdout."""
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
