"""The wheel ships mlxq, server/ and metal/ (with its kernel sources); an install imports from itself."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs a wheel

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_packages_and_installs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("mlxq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("mlxq/__init__.py", "mlxq/cli.py", "server/__init__.py", "metal/__init__.py"):
        assert pkg in names, f"{pkg} missing from {wheel.name}"
    shipped_kernels = {n for n in names if n.startswith("metal/") and n.endswith((".metal", ".cu"))}
    assert shipped_kernels == {f"metal/{p.name}" for p in (ROOT / "metal").glob("*") if p.suffix in (".metal", ".cu")}
    assert {"metal/ternary.metal", "metal/deltanet.metal", "metal/kquants.metal", "metal/ternary.cu",
            "metal/kquants.cu"} <= shipped_kernels

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    # the kernels are read from the installed package (importlib.resources), not from this checkout
    code = ("import mlxq, server, metal; from mlxq.kernels import metal as m; print(mlxq.__file__); "
            "print(server.__file__); print(metal.__file__); assert 'ternary_gemv' in m.kernels('ternary.metal')")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert all(line.startswith(str(target)) for line in out.stdout.split())
