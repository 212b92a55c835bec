"""Multi-token-prediction (MTP) blocks through GGUF: a tiny Qwen3.5 / Qwen3.5-MoE / Qwen3-Next with Qwen's `mtp.*`
weights exports to the same file llama.cpp's own converter writes (names, block count, `nextn_predict_layers`,
recurrent-layer flags, every tensor's numbers), llama.cpp loads its MTP block and gives mlxq's logits, and mlxq's
import gives the `mtp.*` weights back as they were."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from fixtures_gguf import GGUF_TEXT, KINDS, convert_with_llama_cpp
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_tokenizer_dir)
from llama_cpp_run import llama_cpp_layers, llama_cpp_logits
from safetensors.numpy import load_file, save_file
from tiny import randomise_hybrid

from mlxq.formats import open_checkpoint
from mlxq.formats.base import Checkpoint
from mlxq.formats.gguf.doctor import examine, status
from mlxq.formats.gguf.export import export
from mlxq.formats.gguf.reader import read_bytes, read_header
from mlxq.loading import load_model
from mlxq.quant.recipes import gguf_recipe

PROMPT = [(37 * i + 11) % 5000 for i in range(16)]

def add_mtp(hf_dir: Path, seed: int = 7) -> dict[str, np.ndarray]:
    """Qwen's MTP block as its checkpoints carry it (transformers builds none): `fc` over the concatenated embedding
    and hidden state, its three norms, and one decoder layer shaped like the model's attention layers (dense or
    MoE). Returns the added tensors."""
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    config = json.loads((hf_dir / "config.json").read_text())
    full = config["layer_types"].index("full_attention")
    prefix, h = f"model.layers.{full}.", config["hidden_size"]
    rng = np.random.default_rng(seed)

    def like(w: np.ndarray) -> np.ndarray:
        return (rng.normal(0.0, 0.3, w.shape) if w.ndim == 1 else rng.normal(0.0, w.std() + 1e-3, w.shape)).astype(
            np.float32)

    mtp = {f"mtp.layers.0.{k.removeprefix(prefix)}": like(v) for k, v in tensors.items() if k.startswith(prefix)}
    mtp["mtp.fc.weight"] = rng.normal(0.0, 0.1, (h, 2 * h)).astype(np.float32)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{norm}.weight"] = rng.normal(0.0, 0.3, (h,)).astype(np.float32)
    save_file({**tensors, **mtp}, str(path), metadata={"format": "pt"})
    if config["model_type"] != "qwen3_next":  # Qwen3.5's config counts them; Qwen3-Next's does not
        (hf_dir / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    return mtp

@pytest.fixture(scope="module")
def with_mtp(qwen3_tokenizer_dir, tmp_path_factory):
    """kind -> (HF dir with MTP weights, the added tensors, llama.cpp's own conversion with MTP), built once."""
    import torch
    import transformers

    made = {}

    def get(kind: str):
        if kind not in made:
            path = tmp_path_factory.mktemp(f"{kind}-mtp")
            cfg_cls, model_cls, extra = KINDS[kind]
            tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
            torch.manual_seed(3)
            config = getattr(transformers, cfg_cls)(**{**GGUF_TEXT, **extra, "vocab_size": len(tok)})
            model = getattr(transformers, model_cls)(config).eval()
            randomise_hybrid(model)
            hf_dir = path / "hf"
            model.save_pretrained(hf_dir)
            tok.save_pretrained(hf_dir)
            mtp = add_mtp(hf_dir)
            made[kind] = hf_dir, mtp, convert_with_llama_cpp(hf_dir, path / "llama.gguf", mtp=True)
        return made[kind]

    return get

def file_tensors(path: Path) -> dict[str, np.ndarray]:
    header = read_header(path)
    assert {t.kind for t in header.tensors.values()} == {"F32"}
    return {n: read_bytes(path, t).view(np.float32).reshape(t.shape) for n, t in header.tensors.items()}

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mtp_export_is_what_llama_cpps_converter_writes(kind, with_mtp, tmp_path):
    hf_dir, _, theirs = with_mtp(kind)
    ours = tmp_path / "ours.gguf"
    export(str(hf_dir), ours, gguf_recipe("F32"), progress=False)
    mine, ref = file_tensors(ours), file_tensors(theirs)
    assert any(".nextn." in n for n in ref) and set(mine) == set(ref)
    for name, want in ref.items():
        np.testing.assert_allclose(mine[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    meta, ref_meta = read_header(ours).meta, read_header(theirs).meta
    for key in ("block_count", "nextn_predict_layers", "attention.recurrent_layers"):
        np.testing.assert_array_equal(meta[f"{kind}.{key}"], ref_meta[f"{kind}.{key}"], err_msg=key)
    assert meta[f"{kind}.block_count"] == GGUF_TEXT["num_hidden_layers"] + 1
    for path in (ours, theirs):  # and doctor, which checks the tensors against the blocks, finds nothing wrong
        findings = examine(path)[0]
        assert status(findings) == 0, [f.line() for f in findings]

@pytest.mark.parametrize(("kind", "type_"), [("qwen35", "F32"), ("qwen35", "Q8_0"), ("qwen35moe", "F32"),
                                             ("qwen3next", "F32")])
def test_llama_cpp_loads_the_mtp_block_and_agrees_with_mlxq(kind, type_, with_mtp, tmp_path):
    """llama.cpp, told to load MTP blocks, finds one (a missing or misshapen MTP tensor, or one it does not know,
    fails its load) and its logits are mlxq's on the same file."""
    hf_dir, _, _ = with_mtp(kind)
    out = tmp_path / f"{type_}.gguf"
    export(str(hf_dir), out, gguf_recipe(type_), progress=False)
    n = GGUF_TEXT["num_hidden_layers"]
    assert llama_cpp_layers(out) == {"n_layer": n, "n_layer_nextn": 1}
    config = {k: v for k, v in open_checkpoint(str(hf_dir)).config.items()}
    net = load_model(Checkpoint(out, "gguf", config, open_checkpoint(str(out)).tensors), dtype=mx.float32)
    want = np.array(net(mx.array([PROMPT]), net.make_cache())[0])
    got = llama_cpp_logits(out, PROMPT)
    assert np.abs(got - want).max() / np.abs(want).max() <= (1e-4 if type_ == "F32" else 5e-2)

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_import_gives_the_mtp_weights_back(kind, with_mtp, tmp_path):
    """Our export and llama.cpp's conversion both read back as the checkpoint's `mtp.*` tensors (experts stacked
    [experts, out, in]), and the loaded model keeps them for speculative decoding."""
    hf_dir, mtp, theirs = with_mtp(kind)
    ours = tmp_path / "ours.gguf"
    export(str(hf_dir), ours, gguf_recipe("F32"), progress=False)
    want = stacked(mtp)
    for path in (ours, theirs):
        ckpt = open_checkpoint(str(path))
        assert ckpt.config["num_hidden_layers"] == GGUF_TEXT["num_hidden_layers"]
        assert ckpt.config["mtp_num_hidden_layers"] == 1
        got = {n: np.array(ckpt.tensors[n]) for n in ckpt.tensors if n.startswith("mtp.")}
        assert set(got) == set(want)
        for name, w in want.items():
            np.testing.assert_allclose(got[name], w, rtol=1e-6, atol=1e-6, err_msg=name)
    net = load_model(open_checkpoint(str(ours)), dtype=mx.float32)
    assert set(net.mtp_weights) == set(want)

def stacked(mtp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert tensors stacked as the GGUF holds them (`...mlp.experts.gate_proj.weight` [experts, out, in])."""
    out, experts = {}, {}
    for name, w in mtp.items():
        parts = name.split(".")
        if ".mlp.experts." in name and parts[-3].isdigit():
            experts.setdefault(".".join(parts[:-3] + parts[-2:]), {})[int(parts[-3])] = w
        else:
            out[name] = w
    for name, ws in experts.items():
        out[name] = np.stack([ws[e] for e in sorted(ws)])
    return out


def test_no_mtp_leaves_the_blocks_out(with_mtp, tmp_path):
    """`mlxq export --no-mtp` (llama.cpp's converter has the same flag): the model's own blocks only, as before."""
    from click.testing import CliRunner

    from mlxq.formats.gguf.command import export as export_command

    hf_dir, _, theirs = with_mtp("qwen35")
    out = tmp_path / "no-mtp.gguf"
    done = CliRunner().invoke(export_command, [str(hf_dir), "-o", str(out), "--type", "F32", "--no-mtp"])
    assert done.exit_code == 0, done.output
    meta, tensors = read_header(out).meta, file_tensors(out)
    n = GGUF_TEXT["num_hidden_layers"]
    assert meta["qwen35.block_count"] == n and "qwen35.nextn_predict_layers" not in meta
    assert len(meta["qwen35.attention.recurrent_layers"]) == n
    assert set(tensors) == {name for name in file_tensors(theirs)
                            if not name.startswith("blk.") or int(name.split(".")[1]) < n}
    assert "multi-token-prediction tensors are not exported" in done.output
