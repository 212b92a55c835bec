"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) for the benchmarks' peer runs,
and the few steps a peer run takes with them: a float32 GGUF of the stored weights, an importance matrix from a
calibration text, a quantization with it, and bits per weight counted from the GGUF's own tensors.

They are built once from the pinned llama-cpp-python sdist, i.e. from the very llama.cpp the `llama_cpp` package
(a dev dependency) was built from, and cached under `<mlxq cache>/llama.cpp-tools/<version>-no-amx/`. The Python
binding cannot run these: it has no importance-matrix input to its quantizer and no KL-divergence scoring, and
the peer figures must come from llama.cpp's own quantizer with an imatrix and its own scoring.

    python bench/llama_cpp_tools.py          # build if needed (about 10 minutes on 2 cores), print the folder

    f32 = float_gguf(source_gguf, work / "f32.gguf")
    imat = importance_matrix(f32, calibration_txt, work / "imatrix.gguf", ctx=512, chunks=16)
    quantize(f32, work / "q.gguf", "IQ4_NL", imatrix=imat, pure=True)
    bits_per_weight(work / "q.gguf")
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mlxq.formats.fetch import LLAMA_CPP_SDIST, download_sdist

VERSION = LLAMA_CPP_SDIST.package.split("==")[1]
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
# llama.cpp built with -march=native segfaults in its AMX matmul where the CPU has AMX; the Makefile builds
# llama-cpp-python with the same flags (LLAMA_CMAKE_ARGS there)
NO_AMX = ([f"-DCMAKE_{lang}_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" for lang in ("C", "CXX")]
          if platform.machine() in ("x86_64", "AMD64") else [])


def tools_dir() -> Path:
    from mlxq.formats.fetch import cache_dir

    return cache_dir() / "llama.cpp-tools" / (f"{VERSION}-no-amx" if NO_AMX else VERSION)  # older builds have AMX


def tool(name: str) -> Path:
    """Path of one tool, building them all on first use."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r} (have {', '.join(TOOLS)})")
    path = tools_dir() / name
    if not path.exists():
        build()
    return path


def build() -> Path:
    """Downloads the sdist (sha256-checked), builds the tools statically, installs them atomically."""
    out = tools_dir()
    if all((out / t).exists() for t in TOOLS):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        print(f"llama.cpp tools: fetching {LLAMA_CPP_SDIST.package} (sdist)", file=sys.stderr)
        sdist = download_sdist(LLAMA_CPP_SDIST, tmp)
        with tarfile.open(sdist) as t:
            t.extractall(tmp, filter="data")
        src = next(tmp.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build_dir = tmp / "build"
        print(f"llama.cpp tools: building {', '.join(TOOLS)} (about 10 minutes)", file=sys.stderr)
        log = tmp / "build.log"
        _run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
              "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", *NO_AMX], log)
        _run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2), "--target", *TOOLS], log)
        staged = tmp / "tools"
        staged.mkdir()
        for name in TOOLS:
            shutil.copy2(build_dir / "bin" / name, staged / name)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # complete or absent
    return out


def float_gguf(src: Path, out: Path) -> Path:
    """`src` with every tensor stored as float32 (quantized blocks dequantized exactly by llama.cpp): the start
    for an importance matrix and for quantizing from the very numbers the other peers start from."""
    return quantize(src, out, "F32", allow_requantize=True)


def importance_matrix(model: Path, text: Path, out: Path, ctx: int = 512, chunks: int | None = None) -> Path:
    """llama-imatrix over `text` in chunks of `ctx` tokens (the output matmul included)."""
    args = ["-m", model, "-f", text, "-o", out, "-c", ctx, "--process-output", "-t", os.cpu_count() or 2]
    return _tool("llama-imatrix", *args, *(["--chunks", chunks] if chunks else []), out=out)


def quantize(src: Path, out: Path, ftype: str, *, imatrix: Path | None = None, pure: bool = False,
             allow_requantize: bool = False) -> Path:
    """llama-quantize `src` to `ftype` (a name llama-quantize takes: Q4_0, IQ4_NL, Q3_K_M, F32, ...)."""
    flags = [*(["--imatrix", imatrix] if imatrix else []), *(["--pure"] if pure else []),
             *(["--allow-requantize"] if allow_requantize else [])]
    return _tool("llama-quantize", *flags, src, out, ftype, os.cpu_count() or 2, out=out)


def bits_per_weight(path: Path) -> dict:
    """Bits per weight of a GGUF from its own tensors (K-quant blocks carry their own scales): `bpw` over the weight
    matrices, `bpw_all` over every tensor, and the share of matrix weights each block type holds."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    matrices = [t for t in tensors if t.name.endswith(".weight") and sum(d > 1 for d in t.shape) >= 2]
    total_bytes = sum(int(t.n_bytes) for t in tensors)
    matrix_params = sum(int(t.n_elements) for t in matrices)
    share: dict[str, int] = {}
    for t in matrices:
        share[t.tensor_type.name] = share.get(t.tensor_type.name, 0) + int(t.n_elements)
    return {
        "bpw": round(8 * sum(int(t.n_bytes) for t in matrices) / matrix_params, 4),
        "bpw_all": round(8 * total_bytes / sum(int(t.n_elements) for t in tensors), 4),
        "size_mb": round(total_bytes / 1e6, 2),
        "types": {k: round(v / matrix_params, 3) for k, v in sorted(share.items())},
    }


def _tool(name: str, *args, out: Path) -> Path:
    """Runs one tool with its (chatty) output kept in `out`'s log; `out` appears only when the tool succeeded."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    log = out.with_name(f"{out.name}.log")
    argv = [str(tool(name)), *(str(tmp) if a == out else str(a) for a in args)]
    with open(log, "w") as f:
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not tmp.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"{name} failed (exit {done.returncode}; log {log}): {tail}")
    os.replace(tmp, out)
    return out


def _run(cmd: list[str], log: Path) -> None:
    """Runs a build step with its (very chatty) output in `log`; on failure, raises with the log's last lines."""
    with open(log, "a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {done.returncode}):\n{tail}")


if __name__ == "__main__":
    print(build())
