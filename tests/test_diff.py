"""`mlxq inspect --diff`: the contract walk gives the model's own logits; a model against itself has no error; a
layer perturbed on purpose is the one found; a re-quantized SmolLM2's error grows with depth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from test_hybrid import make_tiny as make_hybrid
from test_quant import PROMPT, add_tokenizer
from tiny import make_tiny

from mlxq.cli import cli
from mlxq.errors import InvalidRequest
from mlxq.eval import diff
from mlxq.eval.metrics import load_for_eval

LAYERS = 6
BROKEN = 3  # the layer the perturbed copy changes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A six-layer tiny Llama, and a copy whose layer BROKEN has noise added to its MLP output weights."""
    base = tmp_path_factory.mktemp("llama6")
    make_tiny("llama", base, num_hidden_layers=LAYERS)
    add_tokenizer(base)
    bad = tmp_path_factory.mktemp("llama6-perturbed") / "m"
    shutil.copytree(base, bad)
    weights = mx.load(str(bad / "model.safetensors"))
    name = f"model.layers.{BROKEN}.mlp.down_proj.weight"
    w = weights[name]
    weights[name] = w + 0.5 * mx.std(w) * mx.random.normal(w.shape, key=mx.random.key(0))
    mx.save_safetensors(str(bad / "model.safetensors"), weights, metadata={"format": "pt"})
    return {"base": base, "bad": bad}


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3_5_text"])
def test_walk_through_the_contract_gives_the_models_logits(family, tmp_path):
    if family.startswith("qwen3_5"):
        make_hybrid(family, tmp_path)
    else:
        make_tiny(family, tmp_path)
    add_tokenizer(tmp_path)
    net = load_for_eval(str(tmp_path)).net
    steps = list(diff.walk(net, PROMPT))
    assert len(steps) == len(net.model.layers) + 1
    kinds = {kind for kind, *_ in steps[1:]}
    assert kinds == ({"attention", "deltanet"} if family.startswith("qwen3_5") else {"attention"})
    assert all(diff.MLP in seen for _, _, _, seen in steps[1:])
    ours = diff.lens_logits(net, steps[-1][2][0])
    theirs = net(mx.array(PROMPT)[None], net.make_cache())[0]
    assert np.array_equal(np.array(ours), np.array(theirs))
    assert not any(isinstance(child, diff._Tap) for layer in net.model.layers for child in layer.values())


def test_a_model_against_itself_has_zero_error_at_every_layer(tiny):
    report = diff.run(str(tiny["base"]), str(tiny["base"]), tokens=PROMPT, gen_tokens=6)
    rows = report["models"]["B"]["layers"]
    assert len(rows) == LAYERS + 1
    assert all(r["rel_err"] == 0.0 and abs(r["cos"] - 1) < 1e-6 for r in rows)
    assert report["models"]["B"]["largest_jump"]["layer"] is None and report["models"]["B"]["first_jump"] is None
    assert report["divergence"]["index"] is None
    assert report["models"]["A"]["generated"] == report["models"]["B"]["generated"]
    assert len(report["models"]["A"]["generated"]) == 6
    assert rows[-1]["rank"] == 1  # the model's own next token tops its own output


def test_the_perturbed_layer_is_found(tiny, tmp_path):
    report = diff.run(str(tiny["base"]), str(tiny["bad"]), tokens=PROMPT, gen_tokens=8)
    b = report["models"]["B"]
    errors = [r["rel_err"] for r in b["layers"]]
    assert errors[: BROKEN + 1] == [0.0] * (BROKEN + 1)  # embedding and layers before BROKEN: identical
    assert errors[BROKEN + 1] > 1e-3
    assert b["largest_jump"]["layer"] == BROKEN and b["first_jump"] == BROKEN
    # the reference's statistics are its own, untouched by the comparison
    a = report["models"]["A"]
    assert all(r["rel_err"] == 0.0 for r in a["layers"])
    assert a["layers"][BROKEN + 1]["out_rms"] != b["layers"][BROKEN + 1]["out_rms"]


def test_cli_with_a_reference_table_json_and_plot(tiny, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(" ".join(map(str, PROMPT)))
    png = tmp_path / "diff.png"
    args = ["inspect", "--diff", str(tiny["base"]), str(tiny["bad"]), "--ref", str(tiny["base"]),
            "--tokens", str(tokens), "--gen-tokens", "4"]
    out = CliRunner().invoke(cli, [*args, "--plot", str(png)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert f"B vs ref: largest error jump at layer {BROKEN}" in out.output
    assert "A vs ref: no error at any layer" in out.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".diff.png*"))
    data = json.loads(CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False).output)
    assert list(data["models"]) == ["ref", "A", "B"] and data["reference"] == "ref"
    assert data["models"]["B"]["largest_jump"]["layer"] == BROKEN and data["tokens"] == PROMPT


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--tokens", "t.txt"], "either --prompt TEXT or --tokens FILE"),
    (["--tokens", "t.txt"], "t.txt: expected token ids"),
    (["--tokens", "missing.txt"], "missing.txt: cannot read token file"),
    (["--tokens", "big.txt"], "token id 100000 is outside"),
    (["--prompt", "x", "--plot", "nodir/x.png"], "--plot nodir/x.png: the directory nodir does not exist"),
])
def test_bad_input_is_one_line(tiny, args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("1 2 three")
    (tmp_path / "big.txt").write_text("[1, 2, 100000]")
    from mlxq.cli import main

    monkeypatch.setattr("sys.argv", ["mlxq", "inspect", "--diff", str(tiny["base"]), str(tiny["bad"]), *args])
    monkeypatch.setenv("MLXQ_NO_REEXEC", "1")
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.strip().count("\n") == 0, err


def test_models_of_different_depth_are_refused(tiny, tmp_path):
    other = tmp_path / "llama3"
    make_tiny("llama", other)  # three layers
    add_tokenizer(other)
    with pytest.raises(InvalidRequest, match="has 3 layers, the reference 6"):
        diff.run(str(tiny["base"]), str(other), tokens=PROMPT, gen_tokens=0)


def test_read_tokens_errors(tmp_path):
    (tmp_path / "neg.json").write_text("[1, -2]")
    with pytest.raises(InvalidRequest, match="neg.json: expected a non-empty list"):
        diff.read_tokens(str(tmp_path / "neg.json"))
    (tmp_path / "ok.json").write_text("[1, 2,3]")
    assert diff.read_tokens(str(tmp_path / "ok.json")) == [1, 2, 3]


def test_jumps():
    assert diff.jumps([0.0, 0.0, 0.0]) == (None, 0.0, None)
    largest, top, first = diff.jumps([0.0, 0.1, 0.15, 0.5, 0.55, 0.95])
    assert (largest, first) == (4, 2) and top == pytest.approx(0.4)


def test_requantized_smollm2_errors_grow_with_depth(smollm2_gguf, tmp_path):
    from rich.console import Console

    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import uniform

    q3 = tmp_path / "smollm2-3bit"
    quantize(str(smollm2_gguf), q3, uniform(3), progress=False)
    report = diff.run(str(smollm2_gguf), str(q3), prompt="The history of the printing press begins in the fifteenth "
                      "century, when movable type changed how knowledge spread across Europe.", gen_tokens=4)
    b = report["models"]["B"]
    errors = [r["rel_err"] for r in b["layers"][1:]]
    third = len(errors) // 3
    assert all(e > 0 for e in errors)
    assert sum(errors[-third:]) > 1.25 * sum(errors[:third]) and errors[-1] > 2 * errors[0]  # grows with depth
    assert min(r["cos"] for r in b["layers"]) < 0.999
    jumps = [r["jump"] for r in b["layers"][1:]]
    assert b["largest_jump"]["layer"] == jumps.index(max(jumps))
    console = Console(record=True, width=200)
    diff.show(report, console)
    assert f"B vs A: largest error jump at layer {b['largest_jump']['layer']}" in console.export_text()
