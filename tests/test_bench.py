"""`mlxq bench MODEL --vs PEER`: both rows and the ratios on SmolLM2 against mlx-lm (same directory) and llama.cpp
(same GGUF), expert-stream statistics on a streamed tiny MoE, one-line errors. Figures are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from test_experts import made  # noqa: F401  (pytest fixture: tiny MoE checkpoints, resident and streamed)

from mlxq.bench import runtime


def mlxq_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxq.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    """SmolLM2's weights as a float32 mlx-lm directory (what mlx-lm loads)."""
    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import Recipe

    out = tmp_path_factory.mktemp("smollm2-dir") / "f32"
    quantize(str(smollm2_gguf), out, Recipe("float", "float"), dtype=mx.float32, progress=False)
    return out


SHORT = ["--prompt-tokens", "16", "--gen-tokens", "4", "--runs", "1"]


def rows(text: str) -> set[str]:
    return {line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")} - {""}  # wrapped cells


def test_vs_mlx_lm_table(smollm2_dir):
    table = mlxq_cli("bench", str(smollm2_dir), "--vs", "mlx-lm", *SHORT)
    assert table.returncode == 0, table.stderr
    assert rows(table.stdout) == {"mlxq", "mlx-lm", "mlxq / mlx-lm"}, table.stdout


@pytest.mark.parametrize("peer", ["mlx-lm", "llama.cpp"])
def test_vs_peer_both_rows_and_the_ratios(peer, smollm2_dir, smollm2_gguf):
    from rich.console import Console

    model = str(smollm2_dir if peer == "mlx-lm" else smollm2_gguf)
    # llama.cpp: its spinning pool on a busy machine wants one thread; mlxq keeps the GGUF's blocks, as llama.cpp does
    extra = ["--peer-threads", "1", "--keep-quantized"] if peer == "llama.cpp" else []
    done = mlxq_cli("bench", model, "--vs", peer, *SHORT, *extra, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert list(result["sides"]) == ["mlxq", peer]
    key = peer.replace("-", "_").replace(".", "_")
    assert {f"prefill_tps_vs_{key}", f"decode_tps_vs_{key}", f"ttft_s_vs_{key}"} <= set(result["ratios"])
    for side in result["sides"].values():
        assert len(side["runs"]) == 1 and side["prefill_tps"] > 0 and side["decode_tps"] > 0
    assert 0 <= result["agreeing_tokens"] <= 4
    if peer == "llama.cpp":
        assert "1 decode / 1 prompt threads" in result["sides"][peer]["about"]
        assert "quantized layers" in result["sides"]["mlxq"]["about"]
    assert result["machine"]["blas"]["kind"] in ("openblas", "accelerate", "gpu")  # the CLI preloads OpenBLAS
    assert f"mlxq bench: run 1/1: {peer}" in done.stderr  # progress, a line per step without a terminal
    if sys.platform.startswith("linux"):
        assert result["sides"]["mlxq"]["peak_rss_gb"] > 0.1  # at least the model's float32 weights
    console = Console(record=True, width=160)
    runtime.show(result, console)  # what the command prints without --json
    assert rows(console.export_text()) == {"mlxq", peer, f"mlxq / {peer}"}


def test_streamed_experts_report_their_statistics(made):  # noqa: F811
    _, _, packs = made("qwen3_moe")
    done = mlxq_cli("bench", str(packs), "--expert-memory", "40%", "--json", *SHORT)
    assert done.returncode == 0, done.stderr
    experts = json.loads(done.stdout.splitlines()[-1])["experts"]
    assert experts["hits"] + experts["misses"] > 0 and experts["tokens"] > 0
    assert "hits" in experts["summary"]


@pytest.mark.parametrize("args, message", [
    (["bench"], "give a MODEL, or --io PACKDIR"),
    (["bench", "{gguf}", "--vs", "mlx-lm"], "is not an mlx-lm or HF directory"),
    (["bench", "{dir}", "--vs", "llama.cpp"], "is not a GGUF file"),
])
def test_bad_input_is_one_line(args, message, smollm2_gguf, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    done = mlxq_cli(*[a.format(gguf=smollm2_gguf, dir=tmp_path) for a in args])
    lines = [line for line in done.stderr.splitlines() if line.startswith("mlxq: error:")]
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_timed_definitions():
    tokens, figures = runtime.timed(iter([5, 6, 7]), prompt_tokens=40)
    assert tokens == [5, 6, 7]
    assert figures["prefill_tps"] == pytest.approx(40 / figures["ttft_s"])
    assert figures["decode_tps"] > 0


def test_prompt_is_exactly_n_tokens(smollm2):
    for n in (1, 37, 600):
        assert len(runtime.prompt_ids(smollm2.tokenizer, n)) == n
