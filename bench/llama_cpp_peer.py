"""llama.cpp's own tools as the peer in benchmarks: quantize (optionally with an importance matrix), compute an
importance matrix, and score a model's KL divergence against a base model's logits, all by llama.cpp itself.

    from llama_cpp_peer import quantize, imatrix, kl_base, kl

Each call runs one of the tools `llama_cpp_tools` builds (the very llama.cpp the `llama_cpp` package was built
from) and returns its figures; a failure raises with the tool's last log lines.
"""

from __future__ import annotations

import re
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from llama_cpp_tools import tool


@dataclass
class Timed:
    wall: float  # seconds
    cpu: float  # user + system seconds of the tool's process


def _run(args: list[str]) -> tuple[str, Timed]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise RuntimeError(f"{Path(args[0]).name} failed (exit {done.returncode}):\n{tail}")
    return done.stdout + done.stderr, Timed(wall, cpu)


def quantize(src: Path, dst: Path, kind: str, imatrix: Path | None = None, threads: int = 2) -> Timed:
    """llama-quantize SRC DST KIND (a llama.cpp file type name: Q4_K_M, Q8_0, ...), with --imatrix when given."""
    args = [str(tool("llama-quantize"))]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    _, timed = _run([*args, str(src), str(dst), kind, str(threads)])
    return timed


def imatrix(model: Path, text: Path, out: Path, ctx: int = 512, chunks: int = -1, threads: int = 2) -> Timed:
    """llama-imatrix over `chunks` windows of `ctx` tokens of `text`."""
    _, timed = _run([str(tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
                     "--chunks", str(chunks), "-t", str(threads), "--no-ppl"])
    return timed


def kl_base(model: Path, text: Path, out: Path, ctx: int = 512, chunks: int = -1, threads: int = 2) -> Timed:
    """llama-perplexity saving the base model's logits over `text` (KL-divergence mode's reference)."""
    _, timed = _run([str(tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
                     "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(out)])
    return timed


_MEAN_KLD = re.compile(r"Mean\s+KLD:\s+([-0-9.eE+]+)")


def kl(model: Path, base: Path, ctx: int = 512, threads: int = 2) -> float:
    """Mean KL divergence of `model` from the base logits, as llama-perplexity --kl-divergence reports it."""
    out, _ = _run([str(tool("llama-perplexity")), "-m", str(model), "-c", str(ctx), "-t", str(threads),
                   "--kl-divergence-base", str(base), "--kl-divergence"])
    m = _MEAN_KLD.search(out)
    if m is None:
        raise RuntimeError(f"llama-perplexity printed no mean KLD for {model}")
    return float(m.group(1))
