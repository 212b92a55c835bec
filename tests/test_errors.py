"""Bad input gets one clear line naming the file, tensor or field; never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny import make_tiny

import mlxq
from mlxq.errors import ConfigError, FormatError, ModelNotFound, TokenizerError, UnsupportedModel
from mlxq.formats import open_checkpoint
from mlxq.loading import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny("llama", path)
    return path


def copy_of(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_path():
    with pytest.raises(ModelNotFound, match="no/such/model"):
        open_checkpoint("./no/such/model")


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(FormatError, match=r"model\.safetensors.*truncated"):
        open_checkpoint(str(d))


def test_garbage_safetensors(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(FormatError, match=r"model\.safetensors"):
        open_checkpoint(str(d))


def test_unknown_architecture(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba9000"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="mamba9000"):
        load_model(open_checkpoint(str(d)))


def test_missing_config_field(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model(open_checkpoint(str(d)))


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    import mlx.core as mx

    d = copy_of(tiny_dir, tmp_path / "m")
    weights = mx.load(str(d / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(open_checkpoint(str(d)))


def test_missing_tokenizer(tiny_dir):
    with pytest.raises(TokenizerError, match=str(tiny_dir)):
        mlxq.load(str(tiny_dir))


def run_cli(*args):
    env = {**os.environ, "MLXQ_NO_REEXEC": "1"}
    return subprocess.run([sys.executable, "-m", "mlxq.cli", *args], capture_output=True, text=True, env=env)


def test_cli_error_is_one_line_exit_2(tiny_dir, tmp_path):
    done = run_cli("inspect", str(tmp_path / "nothing-here"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing-here" in lines[0] and "Traceback" not in done.stderr


def test_cli_bad_option_exit_2(tiny_dir):
    done = run_cli("generate", "hi", "--temperature", "-1")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()  # one line naming the option and the value, no usage block
    assert len(lines) == 1 and lines[0].startswith("mlxq: error: "), done.stderr
    assert "'--temperature'" in lines[0] and "-1.0 is not in the range x>=0" in lines[0], lines[0]


def test_cli_inspect(tiny_dir):
    done = run_cli("inspect", str(tiny_dir))
    assert done.returncode == 0, done.stderr
    assert "llama" in done.stdout and "tensors" in done.stdout
