"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) for the benchmarks' peer runs.

They are built once from the pinned llama-cpp-python sdist, i.e. from the very llama.cpp the `llama_cpp` package
(a dev dependency) was built from, and cached under `<mlxq cache>/llama.cpp-tools/<version>/`. The Python
binding cannot run these: it has no importance-matrix input to its quantizer and no KL-divergence scoring, and
the peer figures must come from llama.cpp's own quantizer with an imatrix and its own scoring.

    python bench/llama_cpp_tools.py          # build if needed (about 10 minutes on 2 cores), print the folder
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mlxq.formats.fetch import LLAMA_CPP_SDIST, download_sdist

VERSION = LLAMA_CPP_SDIST.package.split("==")[1]
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def tools_dir() -> Path:
    from mlxq.formats.fetch import cache_dir

    return cache_dir() / "llama.cpp-tools" / VERSION


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
              "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"], log)
        _run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2), "--target", *TOOLS], log)
        staged = tmp / "tools"
        staged.mkdir()
        for name in TOOLS:
            shutil.copy2(build_dir / "bin" / name, staged / name)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # complete or absent
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
