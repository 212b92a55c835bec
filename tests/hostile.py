"""Damaged checkpoints and a bounded loader for the hostile-input tests and fuzzers.

`tiny_gguf` and `tiny_safetensors` write a tiny llama (3 layers, vocab 160) straight from seeded numpy arrays, in
milliseconds, so a fuzzer can write thousands of variants. `BoundedLoader` opens and loads each variant in a worker
process whose address space is limited (RLIMIT_AS) and whose every load has a deadline, so a load that hangs,
allocates without bound or crashes the interpreter is reported as such instead of taking the test run down.
"""

from __future__ import annotations

import json
import math
import os
import resource
import select
import struct
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType, GGUFValueType

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 160, 64, 3, 4, 2, 96
HEAD_DIM = HIDDEN // HEADS
ARCH = "llama"

# HF name suffix -> (shape, GGUF type): norms F32, attention F16, MLP Q8_0, so type damage meets several codecs
BLOCK = {
    "input_layernorm.weight": ((HIDDEN,), "F32"),
    "self_attn.q_proj.weight": ((HEADS * HEAD_DIM, HIDDEN), "F16"),
    "self_attn.k_proj.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), "F16"),
    "self_attn.v_proj.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), "F16"),
    "self_attn.o_proj.weight": ((HIDDEN, HEADS * HEAD_DIM), "F16"),
    "post_attention_layernorm.weight": ((HIDDEN,), "F32"),
    "mlp.gate_proj.weight": ((FFN, HIDDEN), "Q8_0"),
    "mlp.up_proj.weight": ((FFN, HIDDEN), "Q8_0"),
    "mlp.down_proj.weight": ((HIDDEN, FFN), "Q8_0"),
}
GLOBAL = {
    "model.embed_tokens.weight": ((VOCAB, HIDDEN), "F32"),
    "model.norm.weight": ((HIDDEN,), "F32"),
    "lm_head.weight": ((VOCAB, HIDDEN), "Q4_0"),
}

HF_CONFIG: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
    "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}

# GGUF metadata: key -> (value type, value); tokenizer arrays are added by `write_gguf`
GGUF_META: dict[str, tuple[GGUFValueType, Any]] = {
    f"{ARCH}.block_count": (GGUFValueType.UINT32, LAYERS),
    f"{ARCH}.context_length": (GGUFValueType.UINT32, 512),
    f"{ARCH}.embedding_length": (GGUFValueType.UINT32, HIDDEN),
    f"{ARCH}.feed_forward_length": (GGUFValueType.UINT32, FFN),
    f"{ARCH}.attention.head_count": (GGUFValueType.UINT32, HEADS),
    f"{ARCH}.attention.head_count_kv": (GGUFValueType.UINT32, KV_HEADS),
    f"{ARCH}.attention.key_length": (GGUFValueType.UINT32, HEAD_DIM),
    f"{ARCH}.attention.layer_norm_rms_epsilon": (GGUFValueType.FLOAT32, 1e-5),
    f"{ARCH}.rope.freq_base": (GGUFValueType.FLOAT32, 10000.0),
    "tokenizer.ggml.model": (GGUFValueType.STRING, "gpt2"),
    "tokenizer.ggml.bos_token_id": (GGUFValueType.UINT32, 1),
    "tokenizer.ggml.eos_token_id": (GGUFValueType.UINT32, 2),
}


def hf_tensors(seed: int = 0) -> dict[str, tuple[np.ndarray, str]]:
    """HF name -> (float32 array, GGUF type it is stored as)."""
    rng = np.random.default_rng(seed)
    specs = dict(GLOBAL)
    for i in range(LAYERS):
        specs |= {f"model.layers.{i}.{k}": v for k, v in BLOCK.items()}
    return {name: (rng.normal(0, 0.5, shape).astype(np.float32), kind) for name, (shape, kind) in specs.items()}


def gguf_value_type(value: Any) -> GGUFValueType:
    """The GGUF type a Python value is written as (the smallest integer type that holds it)."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return GGUFValueType.UINT32
        if -(1 << 31) <= value < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if value >= 0 else GGUFValueType.INT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT64 if math.isfinite(value) and abs(value) > 3.4e38 else GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    return GGUFValueType.ARRAY


def write_gguf(path: Path, meta: dict[str, tuple[GGUFValueType, Any]] | None = None, seed: int = 0,
               arch: str = ARCH, alignment: int | None = None) -> Path:
    """A tiny llama GGUF as llama.cpp's converter lays it out; `meta` entries replace or add metadata (a value
    of None removes the key)."""
    from mlxq.formats.gguf.names import gguf_name

    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_uint32("general.alignment", alignment)
        w.data_alignment = alignment
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    for key, (kind, value) in {**GGUF_META, **(meta or {})}.items():
        if value is None:
            continue
        sub = gguf_value_type(value[0]) if kind == GGUFValueType.ARRAY and value else None
        w.add_key_value(key, value, kind, sub_type=sub)
    for name, (t, kind) in hf_tensors(seed).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary permutation of q/k rows
            heads = HEADS if "q_proj" in name else KV_HEADS
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)
        target = gguf_name(arch if arch in ("llama", "qwen2", "qwen3") else ARCH, name)
        qtype = GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(target, t)
        elif kind == "F16":
            w.add_tensor(target, t.astype(np.float16))
        else:
            w.add_tensor(target, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_safetensors_dir(root: Path, config: dict | None = None, seed: int = 0) -> Path:
    """A tiny llama HF directory (config.json + one float32 model.safetensors)."""
    import mlx.core as mx

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(HF_CONFIG if config is None else config))
    mx.save_safetensors(str(root / "model.safetensors"), {n: mx.array(t) for n, (t, _) in hf_tensors(seed).items()})
    return root


# ------------------------------------------------------------------------------------------------ byte surgery
@dataclass
class TensorRecord:
    """Where one GGUF tensor-info record's fields sit in the file."""

    name: str
    n_dims_at: int
    dims_at: int
    n_dims: int
    type_at: int
    offset_at: int


def gguf_layout(path: Path) -> tuple[int, int, list[TensorRecord]]:
    """(end of metadata, end of tensor infos, tensor records) of a well-formed GGUF file."""
    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data
    records = []
    for t in r.tensors:
        _, _, n_dims, dims, kind, offset = t.field.parts
        at = [p.ctypes.data - base for p in (n_dims, dims, kind, offset)]
        records.append(TensorRecord(t.name, at[0], at[1], int(n_dims[0]), at[2], at[3]))
    kv_end = min(r.tensors[0].field.offset, r.data_offset)
    infos_end = records[-1].offset_at + 8
    return kv_end, infos_end, records


def patch(path: Path, at: int, fmt: str, value: Any) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt, value))


def rewrite_safetensors_header(path: Path, header: Any, raw: bytes | None = None) -> None:
    """Replaces the JSON header of `path` (or writes `raw` as its header bytes), keeping the data section."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n :])


def safetensors_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


# ------------------------------------------------------------------------------------------------ bounded loads
WORKER = r"""
import contextlib, hashlib, io, json, sys, traceback
out = sys.stdout
sys.stdout = sys.stderr  # whatever the code under test prints stays off the protocol
import mlx.core as mx
import numpy as np
from mlxq.cli import cli
from mlxq.errors import MlxqError
from mlxq.formats import open_checkpoint
from mlxq.loading import load_model

def digest(path, keep):
    ckpt = open_checkpoint(path, keep_quantized=keep)
    h = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        a = ckpt.tensors[name]
        a = a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(np.array(a).tobytes())
    return h.hexdigest()

for line in sys.stdin:
    job = json.loads(line)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["inspect", job["path"]], standalone_mode=False)
        result = {"outcome": "loaded", "digest": digest(job["path"], job["keep"])}
        load_model(open_checkpoint(job["path"], keep_quantized=job["keep"]))
    except MlxqError as e:
        result = {"outcome": "refused", "error": type(e).__name__, "message": str(e)}
    except BaseException as e:
        result = {"outcome": "exception", "error": type(e).__name__, "message": traceback.format_exc()[-3000:]}
    out.write(json.dumps(result) + "\n")
    out.flush()
"""


@dataclass
class Outcome:
    outcome: str  # loaded | refused | exception | crash | timeout
    error: str = ""
    message: str = ""
    digest: str = ""

    @property
    def label(self) -> str:
        return f"{self.outcome}:{self.error}" if self.error else self.outcome


@dataclass
class BoundedLoader:
    """Loads checkpoints in a worker process limited to `memory_bytes` of address space, `timeout_s` per load.
    A worker that dies or runs late is replaced; the outcome says what happened."""

    memory_bytes: int = 3 << 30
    timeout_s: float = 60.0
    counts: Counter = field(default_factory=Counter)
    _proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        limit = self.memory_bytes

        def limit_memory():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        env = {**os.environ, "MLXQ_NO_REEXEC": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        return subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, preexec_fn=limit_memory, text=True)

    def load(self, path: Path, keep_quantized: bool = False) -> Outcome:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        proc.stdin.write(json.dumps({"path": str(path), "keep": keep_quantized}) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s + 30)  # + the worker's start-up
        if not ready:
            self.close()
            result = Outcome("timeout")
        else:
            line = proc.stdout.readline()
            if not line:
                code = proc.wait()
                self._proc = None
                result = Outcome("crash", f"exit {code}")
            else:
                result = Outcome(**json.loads(line))
        self.counts[result.label] += 1
        return result

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


# A fuzz test runs twice: a small fixed-seed budget in `make test`, and the long run behind the slow marker
# (MLXQ_FUZZ_EXAMPLES examples, times a test's own scale).
RUNS = [pytest.param("fast", id="fast"), pytest.param("long", id="long", marks=pytest.mark.slow)]


def budget(run: str, fast: int, scale: int = 1) -> tuple[int, int]:
    """(examples, seed) of a fuzz run."""
    return (fast, 10) if run == "fast" else (int(os.environ.get("MLXQ_FUZZ_EXAMPLES", "3000")) * scale, 20)


@contextmanager
def reporting(name: str, counts: Counter):
    """Counts of one fuzz run, printed as one JSON line at its end, pass or fail (and appended to
    $MLXQ_FUZZ_REPORT when set)."""
    counts.clear()
    try:
        yield counts
    finally:
        line = json.dumps({"fuzz": name, "tried": sum(counts.values()), "outcomes": dict(sorted(counts.items()))})
        print(line)
        if os.environ.get("MLXQ_FUZZ_REPORT"):
            out = Path(os.environ["MLXQ_FUZZ_REPORT"])
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(line + "\n")
