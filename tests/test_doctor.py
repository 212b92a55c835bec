"""`mlxq doctor FILE.gguf`: the divergences of Ollama's Qwen3.5 files are found, llama.cpp refuses the file as the
findings say, and `--fix` writes a copy llama.cpp loads and runs to transformers' logits; damaged files get one line
per problem and an exit status by severity."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from fixtures_gguf import *  # noqa: F403  (pytest fixtures: hybrid_gguf, dense_gguf, moe_gguf)
from fixtures_gguf import PROMPT, hf_config, write_ollama_style
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_tokenizer_dir)
from gguf.constants import GGUFValueType
from llama_cpp_run import llama_cpp_logits

from mlxq.errors import FormatError
from mlxq.formats import open_checkpoint
from mlxq.formats.gguf import names
from mlxq.formats.gguf.doctor import examine, repair, status
from mlxq.formats.gguf.reader import Strings, read_bytes, read_header
from mlxq.formats.gguf.writer import GGUFOut, TensorOut, Value
from mlxq.loading import load_model


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxq.cli", "doctor", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={"MLXQ_NO_REEXEC": "1", **__import__("os").environ})


def messages(path) -> list[str]:
    return [f.line() for f in examine(path)[0]]


def rewrite(src, out, meta_changes: dict | None = None, drop: set | None = None, transform=None):
    """A copy of a GGUF with metadata changed (None deletes a key), tensors dropped or their bytes changed."""
    header = read_header(src)
    metadata = {}
    for key, value in header.meta.items():
        kind, item = header.types[key]
        value = value.read(src) if isinstance(value, Strings) else value.tolist() if hasattr(value, "tolist") else value
        metadata[key] = Value(value, GGUFValueType(kind), None if item is None else GGUFValueType(item))
    for key, value in (meta_changes or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    records = [t for n, t in header.tensors.items() if n not in (drop or set())]
    with GGUFOut(out, header.meta["general.architecture"], metadata,
                 [TensorOut(t.name, t.shape, t.kind) for t in records]) as w:
        for t in records:
            data = read_bytes(src, t)
            w.write(t.name, transform(t, data) if transform else data)
    return out


def assert_repair_runs(path, want_logits) -> None:
    """--fix leaves nothing to report, and llama.cpp runs the repaired file to the model's own logits."""
    fixed = path.with_name(path.stem + "-fixed.gguf")
    assert status(repair(path, fixed)) == 0
    assert rel(llama_cpp_logits(fixed, PROMPT), want_logits) < 1e-3


def test_llama_cpp_converted_file_is_clean(hybrid_gguf):
    findings = examine(hybrid_gguf.gguf)[0]
    assert status(findings) == 0, [f.line() for f in findings]


@pytest.mark.parametrize("kind", ["qwen35", "qwen35moe"])  # what Ollama writes
def test_ollama_file_found_refused_by_llama_cpp_and_fixed(_hybrid_models, tmp_path, kind):
    hybrid_gguf = _hybrid_models(kind)
    ollama = write_ollama_style(hybrid_gguf.gguf, tmp_path / "ollama.gguf")
    found = "\n".join(messages(ollama))
    for what in ("another model in the same file", "lack the '.bias' suffix", "'blk.N.ssm_ba' hold b and a fused",
                 "has 3 elements", "per-layer array"):
        assert what in found, (what, found)
    with pytest.raises(AssertionError, match="Failed to load model"):  # llama.cpp refuses the file
        llama_cpp_logits(ollama, PROMPT)

    assert_repair_runs(ollama, hybrid_gguf.logits)
    net = load_model(open_checkpoint(str(ollama.with_name("ollama-fixed.gguf"))))  # and mlxq still reads it
    assert rel(net(mx.array([PROMPT]), net.make_cache())[0], hybrid_gguf.logits) < 1e-4


def test_grouped_value_heads_are_reordered(dense_gguf, tmp_path):
    """A file that keeps HF's grouped value-head order and says so (Ollama's flag false): llama.cpp would compute
    garbage; the fix moves every DeltaNet tensor's heads, and llama.cpp then gives transformers' logits."""
    hybrid_gguf = dense_gguf
    config = open_checkpoint(str(hybrid_gguf.gguf)).config

    def to_grouped(t, data):
        hf = names.hf_name("qwen35", t.name, config["num_hidden_layers"])
        perms = [p for p in names.transforms("qwen35", hf or "") if isinstance(p, names.TiledVHeads)]
        value = data.view(np.float32).reshape(t.shape)
        for p in perms:
            value = p.to_hf(value, config)
        return np.ascontiguousarray(value).view(np.uint8).reshape(-1)

    grouped = rewrite(hybrid_gguf.gguf, tmp_path / "grouped.gguf", transform=to_grouped,
                      meta_changes={"qwen35.ssm.v_head_reordered": Value(False, GGUFValueType.BOOL)})
    assert rel(llama_cpp_logits(grouped, PROMPT), hybrid_gguf.logits) > 0.05  # garbage, as the finding says
    assert any("grouped order" in m for m in messages(grouped))
    assert_repair_runs(grouped, hybrid_gguf.logits)


def test_damaged_files_one_line_per_problem(dense_gguf, tmp_path):
    hybrid_gguf = dense_gguf
    src = hybrid_gguf.gguf
    pruned = rewrite(src, tmp_path / "pruned.gguf", drop={"blk.1.ssm_out.weight", "blk.2.ssm_out.weight"})
    assert any("2 DeltaNet block(s) (1-2) lack tensors" in m and "ssm_out.weight" in m for m in messages(pruned))
    bare = rewrite(src, tmp_path / "bare.gguf", meta_changes={"tokenizer.chat_template": None,
                                                               "tokenizer.ggml.tokens": None})
    found = messages(bare)
    assert any(m.startswith("error: no tokenizer") for m in found)
    assert any(m.startswith("warning: no chat template") for m in found)
    sections = rewrite(src, tmp_path / "sections.gguf", meta_changes={
        "qwen35.rope.dimension_sections": Value([11, 11, 10, 0], GGUFValueType.ARRAY, GGUFValueType.INT32)})
    assert any("sums to more than the head size 16" in m for m in messages(sections))
    assert_repair_runs(sections, hybrid_gguf.logits)


def test_unknown_tensor_type_is_a_finding_and_a_load_error(dense_gguf, tmp_path):
    hybrid_gguf = dense_gguf
    data = bytearray(hybrid_gguf.gguf.read_bytes())
    header = read_header(hybrid_gguf.gguf)
    name = b"output_norm.weight"
    at = data.index(name + b"\x01\x00\x00\x00") + len(name) + 4 + 8  # name, n_dims=1, one dim: then the type
    data[at : at + 4] = (77).to_bytes(4, "little")
    bad = tmp_path / "bad-type.gguf"
    bad.write_bytes(bytes(data))
    assert header.tensors["output_norm.weight"].kind == "F32"
    assert any("'output_norm.weight' has type 77" in m for m in messages(bad))
    with pytest.raises(FormatError, match="output_norm.weight"):
        open_checkpoint(str(bad))


def test_cli_exit_status_and_fix(moe_gguf, tmp_path):
    hybrid_gguf = moe_gguf
    clean = doctor(hybrid_gguf.gguf)
    assert clean.returncode == 0 and "no problems found" in clean.stdout
    ollama = write_ollama_style(hybrid_gguf.gguf, tmp_path / "ollama.gguf")
    found = doctor(ollama)
    assert found.returncode == 2
    lines = found.stdout.strip().splitlines()
    assert len(lines) == len(examine(ollama)[0]) and all(line.startswith(("error:", "note:")) for line in lines)
    assert doctor(ollama, "--fix").returncode == 2 and "-o OUT" in doctor(ollama, "--fix").stderr
    fixed = tmp_path / "fixed.gguf"
    done = doctor(ollama, "--fix", "-o", fixed)
    assert done.returncode == 0 and f"wrote {fixed}" in done.stdout and fixed.exists()
    same = doctor(ollama, "--fix", "-o", ollama)
    assert same.returncode == 2 and same.stderr.count("\n") == 1  # one line, no traceback
    assert hf_config(hybrid_gguf)["num_experts"] == open_checkpoint(str(fixed)).config["num_experts"]
