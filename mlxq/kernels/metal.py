"""The Python side of `metal/*.metal` (and the `.cu` twins): kernel sources read from the package, launches
described as data.

A `.metal` file holds what `mx.fast.metal_kernel` takes: an optional header (helpers shared by the file's
kernels) and kernel bodies, each after a marker line:

    // @header
    ...helpers...
    // @kernel ternary_gemv(w, scales, x) -> (y)
    ...body: MLX writes the signature (typed by the inputs and template arguments) around it...

A builder returns a `Launch` (the kernel plus inputs, grid, threadgroup, template arguments, output shapes);
`run` hands it to MLX on Metal. The same `Launch` is what the Linux proof harness in tests/metal/ turns into
MLX's exact source, compiles with clang and executes in its emulator, so what is tested is what Metal runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import mlx.core as mx

from mlxq.errors import ConfigError

_MARKER = re.compile(r"^// @(header|kernel) ?(\w*)(?:\((.*?)\) -> \((.*?)\))?\s*$", re.M)


@dataclass(frozen=True)
class Kernel:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str = ""
    file: str = ""

    def mlx(self):
        return _compiled(self)


@dataclass
class Launch:
    kernel: Kernel
    inputs: list[mx.array]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: list[tuple[str, int | bool | mx.Dtype]] = field(default_factory=list)
    init_value: float | None = None


@cache
def kernels(file: str) -> dict[str, Kernel]:
    """The kernels of `metal/<file>` by name."""
    text = resources.files("metal").joinpath(file).read_text()
    marks = list(_MARKER.finditer(text))
    header, out = "", {}
    for i, m in enumerate(marks):
        body = text[m.end() + 1 : marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        if m.group(1) == "header":
            header = body
            continue
        names = lambda s: tuple(n.strip() for n in s.split(",") if n.strip())  # noqa: E731
        out[m.group(2)] = Kernel(m.group(2), names(m.group(3)), names(m.group(4)), body.rstrip() + "\n", header, file)
    if not out:
        raise ConfigError(f"metal/{file}: no '// @kernel NAME(inputs) -> (outputs)' section")
    return out


@cache
def _compiled(k: Kernel):
    """MLX's kernel object: `mx.fast.metal_kernel` for .metal sources, `mx.fast.cuda_kernel` for their .cu twins
    (same launch description; MLX's CUDA build reads the grid in threads too)."""
    make = mx.fast.cuda_kernel if k.file.endswith(".cu") else mx.fast.metal_kernel
    return make(name=k.name, input_names=list(k.input_names), output_names=list(k.output_names),
                source=k.source, header=k.header)


def run(launch: Launch) -> list[mx.array]:
    """Runs a launch through MLX (Metal for .metal kernels, MLX's CUDA build for .cu ones)."""
    return launch.kernel.mlx()(
        inputs=launch.inputs, output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes,
        grid=launch.grid, threadgroup=launch.threadgroup, template=launch.template or None,
        init_value=launch.init_value,
    )
