"""Proof of Metal kernels on Linux, without a Mac: for a `Launch` (mlxq/kernels/metal.py) —

(a) `mlx_source`: the exact source MLX compiles for it (our reproduction of `mx.fast.metal_kernel`'s generated
    signature and template instantiation), checked against `exported_source`, the text MLX itself records
    when the launch is traced by `mx.export_function` (which works without Metal);
(b) `clang_check`: that source compiled (-fsyntax-only) by clang from the libclang wheel against
    include/msl_check.h, a Metal subset in which device / constant / threadgroup are real address spaces;
(c) `emulate`: that source compiled by g++ against include/msl_emu.h and run on the CPU: threads as fibers that
    switch at barriers and simd ops, threadgroup memory poisoned per group, buffers fenced by guard pages,
    under a chosen thread schedule ("forward", "reverse", "shuffle" with a seed).

The CUDA twins (`metal/*.cu`, `mx.fast.cuda_kernel`) go through the same emulator (include/cuda_emu.h maps
blocks, warps and __shfl_xor_sync onto it), with `cuda_source` reproducing MLX's CUDA generated source; MLX
cannot trace a CUDA kernel without a CUDA build, so that reproduction is not cross-checked here.

Two mechanical rewrites separate the source from what clang / g++ accept, both applied to the exact source and
nothing else: threadgroup arrays declared in the kernel body become function statics (C++ has no address
space for automatic variables; statics are also what makes the group's fibers share them), and the attribute
lists of the explicit instantiation line (`template [[host_name(..)]] [[kernel]]`) are dropped (standard C++
does not allow them there; they only name the entry point).

To prove a new kernel: write its builder so it returns a `Launch`, then in a test compare `emulate(launch)`
with the reference op on a few shapes (ragged ones included) under every schedule in SCHEDULES, and add the
launch to the source / clang tests. See tests/metal/README.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxq.kernels.metal import Launch

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
SCHEDULES = [("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)]
MAX_CONSTANT_ARRAY = 8  # MLX passes inputs with fewer elements in the constant address space

TYPE_NAMES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float64: "double",
    mx.complex64: "complex64_t", mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}
# Kernel attributes MLX adds to the signature when the source mentions them, in MLX's order, with their types.
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"), ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"), ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"), ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"), ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
CUDA_TYPE_NAMES = {**TYPE_NAMES, mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"}
NP_DTYPES = {
    mx.float32: np.float32, mx.float16: np.float16, mx.int8: np.int8, mx.uint8: np.uint8, mx.int16: np.int16,
    mx.uint16: np.uint16, mx.int32: np.int32, mx.uint32: np.uint32, mx.int64: np.int64, mx.uint64: np.uint64,
    mx.bool_: np.bool_,
}


# ------------------------------------------------------------------------------------ (a) the exact source
@dataclass
class Param:
    """One kernel parameter: a buffer (an input, its shape / strides / ndim, an output) or an attribute."""

    name: str
    decl: str  # C type as written in the signature
    kind: str  # "input", "scalar", "shape", "strides", "ndim", "output", "attribute"
    index: int = -1  # the input / output it belongs to


def _template_text(template) -> tuple[str, str]:
    """MLX's template definition "<float, 4>" and the hash it appends to the kernel name ("_float_4")."""
    parts = []
    for _, arg in template:
        if isinstance(arg, mx.Dtype):
            parts.append(TYPE_NAMES[arg])
        else:
            parts.append(str(int(arg)))
    definition = "<" + ", ".join(parts) + ">"
    hashed = definition.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    return definition, hashed


def is_cuda(launch: Launch) -> bool:
    return launch.kernel.file.endswith(".cu")


def kernel_name(launch: Launch) -> str:
    if is_cuda(launch):  # MLX's CUDA naming: the template values only
        return "custom_kernel_" + launch.kernel.name + "".join(
            "_" + (CUDA_TYPE_NAMES[v] if isinstance(v, mx.Dtype) else ("t" if v else "f") if isinstance(v, bool)
                   else str(v)) for _, v in launch.template)
    name = "custom_kernel_" + launch.kernel.name
    if launch.template:
        name += "_" + _template_text(launch.template)[1]
    for a in launch.inputs:
        name += "_" + TYPE_NAMES[a.dtype] + ("s" if a.ndim == 0 else "c" if a.size < MAX_CONSTANT_ARRAY else "")
    for d in launch.output_dtypes:
        name += "_" + TYPE_NAMES[d]
    return name


def signature(launch: Launch) -> list[Param]:
    k, src = launch.kernel, launch.kernel.source
    if is_cuda(launch):  # every input a pointer, outputs after; no attributes (threadIdx & co. are builtins)
        if any(f"{n}_{s}" in src for n in k.input_names for s in ("shape", "strides", "ndim")):
            raise NotImplementedError("the harness does not emulate CUDA _shape/_strides/_ndim arguments")
        return ([Param(n, f"const {CUDA_TYPE_NAMES[a.dtype]}*", "input", i)
                 for i, (n, a) in enumerate(zip(k.input_names, launch.inputs, strict=True))]
                + [Param(n, f"{CUDA_TYPE_NAMES[d]}*", "output", i)
                   for i, (n, d) in enumerate(zip(k.output_names, launch.output_dtypes, strict=True))])
    params = []
    for i, (name, a) in enumerate(zip(k.input_names, launch.inputs, strict=True)):
        space = "constant" if a.size < MAX_CONSTANT_ARRAY else "device"
        ref = "&" if a.ndim == 0 else "*"
        params.append(Param(name, f"const {space} {TYPE_NAMES[a.dtype]}{ref}", "scalar" if a.ndim == 0 else "input",
                            i))
        if a.ndim > 0:
            for suffix, decl in (("shape", "const constant int*"), ("strides", "const constant int64_t*"),
                                 ("ndim", "const constant int&")):
                if f"{name}_{suffix}" in src:
                    params.append(Param(f"{name}_{suffix}", decl, suffix, i))
    for i, (name, d) in enumerate(zip(k.output_names, launch.output_dtypes, strict=True)):
        params.append(Param(name, f"device {TYPE_NAMES[d]}*", "output", i))
    for attr, ctype in ATTRIBUTES:
        if attr in src:
            params.append(Param(attr, ctype, "attribute"))
    return params


def cuda_source(launch: Launch) -> str:
    """What `mx.fast.cuda_kernel` generates (after its default header, which includes MLX's CUDA device utils and
    cooperative_groups): the kernel in namespace mlx::core::cu, template arguments as constexprs / aliases."""
    k, name = launch.kernel, kernel_name(launch)
    out = k.header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    out += f"__global__ void {name}(\n" + ",\n".join(f"    {p.decl} {p.name}" for p in signature(launch)) + ") {\n"
    if launch.template:
        for n, v in launch.template:
            if isinstance(v, mx.Dtype):
                out += f"  using {n} = {CUDA_TYPE_NAMES[v]};\n"
            else:
                out += f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {n} = {str(v).lower()};\n"
        out += "\n"
    return out + k.source + "\n}\n\n} // namespace mlx::core::cu\n"


def mlx_source(launch: Launch) -> str:
    """The kernel source MLX generates for this launch (MLX prepends its metal utils header when compiling)."""
    if is_cuda(launch):
        return cuda_source(launch)
    k, name, params = launch.kernel, kernel_name(launch), signature(launch)
    out = k.header
    if launch.template:
        kinds = {bool: "bool", int: "int"}
        out += "template <" + ", ".join(
            f"{'typename' if isinstance(v, mx.Dtype) else kinds[type(v)]} {n}" for n, v in launch.template) + ">\n"
    out += f"[[kernel]] void {name}(\n"
    lines = []
    buffer = 0
    for p in params:
        if p.kind == "attribute":
            lines.append(f"  {p.decl} {p.name} [[{p.name}]]")
        else:
            lines.append(f"  {p.decl} {p.name} [[buffer({buffer})]]")
            buffer += 1
    out += ",\n".join(lines) + ") {\n" + k.source + "\n}\n"
    if launch.template:
        definition = name + _template_text(launch.template)[0]
        out += (f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({definition}) {definition};\n')
    return out


def exported_source(launch: Launch) -> tuple[str, str]:
    """(kernel name, source) as MLX itself records them: the launch traced by mx.export_function, read back
    from the file (strings there are a little-endian uint64 length followed by the bytes)."""
    from mlxq.kernels.metal import run

    def fn(*inputs):
        return run(Launch(launch.kernel, list(inputs), launch.output_shapes, launch.output_dtypes, launch.grid,
                          launch.threadgroup, launch.template, launch.init_value))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.mlxfn"
        mx.export_function(str(path), fn, *launch.inputs)
        raw = path.read_bytes()
    at = raw.index(b"CustomKernel") + len(b"CustomKernel")
    strings = []
    for _ in range(2):
        (n,) = struct.unpack_from("<Q", raw, at)
        strings.append(raw[at + 8 : at + 8 + n].decode())
        at += 8 + n
    return strings[0], strings[1]


# ------------------------------------------------------------------------------------------ rewrites
_TG_DECL = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\];]+\])+)\s*;")
_INSTANTIATION_ATTRS = re.compile(r"^template \[\[host_name\(\"\w+\"\)\]\] \[\[kernel\]\] ", re.M)


def for_clang(source: str) -> str:
    source = _TG_DECL.sub(r"static threadgroup \1 \2\3;", source)
    return _INSTANTIATION_ATTRS.sub("template ", source)


def for_emulator(source: str) -> str:
    source = _TG_DECL.sub(r"MLXQ_THREADGROUP(\1, \2, \3);", source)
    return _INSTANTIATION_ATTRS.sub("template ", source)


# ---------------------------------------------------------------------------------------- (b) clang
def clang_check(source: str) -> list[str]:
    """Errors (and warnings other than the Metal attributes clang does not know) of compiling the source."""
    import clang.cindex as ci

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cpp"
        path.write_text(f'#include "{INCLUDE / "msl_check.h"}"\n' + for_clang(source))
        tu = ci.Index.create().parse(str(path), args=["-x", "c++", "-std=c++17", "-fsyntax-only",
                                                      "-Wno-unknown-attributes", "-Wall"])
        return [f"{d.location.line}: {d.spelling}" for d in tu.diagnostics if d.severity >= ci.Diagnostic.Warning]


# ------------------------------------------------------------------------------------- (c) emulator
def _cache_dir() -> Path:
    path = Path(os.environ.get("MLXQ_CACHE", Path.home() / ".cache" / "mlxq")) / "metal-emu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _entry_shim(launch: Launch) -> str:
    """The C++ that calls the kernel for one thread: buffers from the driver's array, attributes from the
    thread's info, in the signature's order."""
    name = kernel_name(launch)
    if is_cuda(launch):
        name = "mlx::core::cu::" + name
    elif launch.template:
        name += _template_text(launch.template)[0]
    args, buffer = [], 0
    for p in signature(launch):
        if p.kind == "attribute":
            args.append(f"t.{p.name}")
            continue
        ctype = p.decl.replace("device ", "").replace("constant ", "")
        args.append(f"*({ctype[:-1]}*)kernel_buffers[{buffer}]" if ctype.endswith("&")
                    else f"({ctype})kernel_buffers[{buffer}]")
        buffer += 1
    return ("\nvoid** kernel_buffers;\n"
            "void run_kernel_thread(const mlxq_emu::ThreadInfo& t) {\n"
            f"  {name}({', '.join(args)});\n}}\n")


def build(launch: Launch, source: str | None = None) -> Path:
    """The emulator executable for this launch's source (cached by content)."""
    prelude = "namespace cooperative_groups {}\n" if is_cuda(launch) else ""
    text = (f'#include "{INCLUDE / ("cuda_emu.h" if is_cuda(launch) else "msl_emu.h")}"\n' + prelude
            + for_emulator(source or mlx_source(launch)) + _entry_shim(launch)
            + f'#include "{INCLUDE / "msl_emu_main.cpp"}"\n')
    deps = "".join((INCLUDE / f).read_text() for f in ("msl_emu.h", "cuda_emu.h", "msl_emu_main.cpp"))
    key = hashlib.sha256((text + deps).encode()).hexdigest()[:16]
    exe = _cache_dir() / f"{launch.kernel.name}-{key}"
    if not exe.exists():
        src = exe.with_suffix(".cpp")
        src.write_text(text)
        tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
        res = subprocess.run(["g++", "-std=c++17", "-O1", "-g0", "-w", "-o", str(tmp), str(src)],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"emulator build of {launch.kernel.name} failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, exe)
    return exe


class EmulatorError(RuntimeError):
    pass


def emulate(launch: Launch, schedule: tuple[str, int] = ("forward", 0), source: str | None = None) -> list[np.ndarray]:
    """Runs the launch on the CPU; returns the outputs. Raises EmulatorError with the emulator's one-line
    diagnosis (barrier divergence, deadlock, out-of-bounds access)."""
    exe = build(launch, source)
    k = launch.kernel
    order = {"forward": 0, "reverse": 1, "shuffle": 2}[schedule[0]]
    with tempfile.TemporaryDirectory() as tmp:
        lines, outputs = [], []
        for p in signature(launch):
            if p.kind == "attribute":
                continue
            if p.kind in ("input", "scalar"):
                data = np.ascontiguousarray(np.asarray(launch.inputs[p.index]))
            elif p.kind == "shape":
                data = np.asarray(launch.inputs[p.index].shape, np.int32)
            elif p.kind == "strides":
                shape = launch.inputs[p.index].shape
                data = np.asarray([int(np.prod(shape[i + 1 :])) for i in range(len(shape))], np.int64)
            elif p.kind == "ndim":
                data = np.asarray(launch.inputs[p.index].ndim, np.int32)
            else:
                shape, dtype = launch.output_shapes[p.index], NP_DTYPES[launch.output_dtypes[p.index]]
                data = (np.full(shape, launch.init_value, dtype) if launch.init_value is not None
                        else np.zeros(shape, dtype))
            path = Path(tmp) / f"{len(lines)}.bin"
            path.write_bytes(data.tobytes() or b"\0")
            kind = "out" if p.kind == "output" and launch.init_value is None else (
                "inout" if p.kind == "output" else "in")
            lines.append(f"{kind} {max(data.nbytes, 1)} {path}")
            if p.kind == "output":
                outputs.append((path, data.shape, data.dtype))
        manifest = Path(tmp) / "manifest"
        manifest.write_text(f"grid {' '.join(map(str, launch.grid))}\ntg {' '.join(map(str, launch.threadgroup))}\n"
                            f"schedule {order} {schedule[1]}\nfull_groups {int(is_cuda(launch))}\n"
                            f"buffers {len(lines)}\n" + "\n".join(lines) + "\n")
        res = subprocess.run([str(exe), str(manifest)], capture_output=True, text=True, timeout=300)
        if res.returncode:
            raise EmulatorError(f"{k.name}: {res.stderr.strip() or f'exit {res.returncode}'}")
        return [np.frombuffer(p.read_bytes(), dt).reshape(shape) for p, shape, dt in outputs]
