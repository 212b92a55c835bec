"""`mlxq bench MODEL --vs PEER`: both rows and the ratios on SmolLM2 against mlx-lm (same directory) and llama.cpp
(same GGUF), expert-stream statistics on a streamed tiny MoE, one-line errors. Figures are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import pytest
from test_experts import made  # noqa: F401  (pytest fixture: tiny MoE checkpoints, resident and streamed)

from mlxq.bench import runtime
from mlxq.experts.pack import open_pack_dir


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


# ------------------------------------------------------------------------------------------------- resumable runs
def bench_script(name: str):
    """bench/NAME.py as a module (nothing runs on import). The bench folder leaves sys.path again: its `kernels.py`
    would otherwise pass for Hugging Face's `kernels` package."""
    import importlib
    from pathlib import Path

    saved = list(sys.path)
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


def test_a_quick_run_never_replaces_the_recorded_full_result(tmp_path, monkeypatch):
    common = bench_script("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "machine", lambda: {})
    common.write_result("demo", {"quick": False, "ratio": 1.0})
    common.write_result("demo", {"quick": True, "ratio": 2.0})
    assert json.loads((tmp_path / "demo.json").read_text())["ratio"] == 1.0
    assert json.loads((tmp_path / "demo-quick.json").read_text())["ratio"] == 2.0


def quant_quality():
    """bench/quant_quality.py: its plan, selection, store use and ratios."""
    return bench_script("quant_quality")


@pytest.fixture
def code_root(tmp_path):
    """A source tree with one file, `variant_code.py`, standing for the code a result depends on."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "variant_code.py").write_text("STEP = 1\n")
    return root


INPUTS = {"baseline": "b" * 64, "calibration": "c" * 64, "eval": "e" * 64, "group_size": 64,
          "versions": {"mlx_lm": "0.1", "llama_cpp": "0.3.36"}}
CODE = ("variant_code.py",)


def test_store_reuses_only_what_matches(code_root, tmp_path):
    from mlxq.bench.store import VariantStore

    store = VariantStore(tmp_path / "results", INPUTS, code_root)
    result = {"bits": 3, "kl": 0.5}
    store.put("mlxq-gptq-3bit", result, {"dep": {"kl": 1.0}}, CODE)
    record = store.get("mlxq-gptq-3bit", {"dep": {"kl": 1.0}}, CODE)
    assert record["result"] == result and list(record["code"]) == ["variant_code.py"]
    assert record["stored"].endswith("Z")
    assert store.get("mlxq-gptq-2bit", {"dep": {"kl": 1.0}}, CODE) is None  # another variant
    assert store.get("mlxq-gptq-3bit", {"dep": {"kl": 1.1}}, CODE) is None  # what it was aimed at changed
    assert store.get("mlxq-gptq-3bit", {"dep": {"kl": 1.0}}) is None  # no code named: nothing to vouch for it
    for key, value in [("calibration", "d" * 64), ("baseline", "a" * 64), ("group_size", 32),
                       ("versions", {"mlx_lm": "0.2", "llama_cpp": "0.3.36"})]:
        changed = VariantStore(tmp_path / "results", {**INPUTS, key: value}, code_root)
        assert changed.get("mlxq-gptq-3bit", {"dep": {"kl": 1.0}}, CODE) is None, key
    (code_root / "variant_code.py").write_text("STEP = 2\n")  # the code that produced it changed
    assert store.get("mlxq-gptq-3bit", {"dep": {"kl": 1.0}}, CODE) is None
    (code_root / "variant_code.py").write_text("STEP = 1\n")
    assert store.get("mlxq-gptq-3bit", {"dep": {"kl": 1.0}}, CODE)["result"] == result
    (code_root / "variant_code.py").unlink()
    assert store.get("mlxq-gptq-3bit", {"dep": {"kl": 1.0}}, CODE) is None


def test_store_fingerprint_is_the_runner_and_the_scoring(tmp_path):
    """A result names its runner's function and the scoring modules: a change elsewhere (another module, another
    runner in the same file) keeps it; a change to the scoring or to its runner invalidates it."""
    from mlxq.bench.store import VariantStore, source_digests

    root = tmp_path / "src"
    (root / "scoring").mkdir(parents=True)
    bench = ("import contextlib\n\n\ndef run_a():\n    return 1\n\n\n"
             "@contextlib.contextmanager\ndef run_b():\n    yield 2\n")
    (root / "bench.py").write_text(bench)
    (root / "scoring" / "metrics.py").write_text("def kl(p, q):\n    return p - q\n")
    (root / "serve.py").write_text("PORT = 8080\n")
    units = ("bench.py:run_a", "scoring/")
    store = VariantStore(tmp_path / "results", INPUTS, root)
    store.put("mlx_lm-awq-3bit", {"kl": 1.37}, None, units)

    def kept() -> bool:
        return store.get("mlx_lm-awq-3bit", None, units) is not None

    assert kept()
    (root / "serve.py").write_text("PORT = 8081\n")  # an unrelated module
    (root / "bench.py").write_text(bench.replace("yield 2", "yield 3"))  # another runner in the same file
    (root / "scoring" / "notes.txt").write_text("not Python")
    assert kept()
    (root / "scoring" / "metrics.py").write_text("def kl(p, q):\n    return q - p\n")  # the scoring changed
    assert not kept()
    (root / "scoring" / "metrics.py").write_text("def kl(p, q):\n    return p - q\n")
    assert kept()
    (root / "scoring" / "extra.py").write_text("SCALE = 2\n")  # a new scoring module
    assert not kept()
    (root / "scoring" / "extra.py").unlink()
    (root / "bench.py").write_text(bench.replace("return 1", "return 0"))  # its own runner changed
    assert not kept()
    (root / "bench.py").write_text(bench)
    assert kept()
    assert store.get("mlx_lm-awq-3bit", None, ("bench.py:run_a",)) is None  # recorded under other units
    digests = source_digests(root, ("bench.py:run_b",))
    (root / "bench.py").write_text(bench.replace("@contextlib.contextmanager\n", ""))  # decorators are its source
    assert source_digests(root, ("bench.py:run_b",)) != digests
    for missing in ("bench.py:run_c", "nowhere.py", "nowhere/"):
        with pytest.raises(ValueError, match="no such"):
            source_digests(root, (missing,))


def test_quant_quality_names_each_variants_code():
    """Every variant of the full plan names code that exists, the scoring included, and its own runner rather than
    the whole bench file (so a result survives changes to the other runners)."""
    from pathlib import Path

    from mlxq.bench.store import source_digests

    qq = quant_quality()
    root = Path(qq.__file__).resolve().parent.parent
    variants = {v.label: v for v in qq.plan(False, root, [], "", root)}
    for label, v in variants.items():
        assert set(qq.SCORING) <= set(v.code) and "bench/quant_quality.py" not in v.code, label
        assert len(source_digests(root, v.code)) == len(set(v.code)), label
    assert "bench/quant_quality.py:run_mlx_lm_awq" in variants["mlx_lm-awq-3bit"].code
    assert "bench/quant_quality.py:run_mlx_lm_dwq" not in variants["mlx_lm-awq-3bit"].code
    assert "bench/quant_quality.py:dequantized_matmul" in variants["mlx_lm-dwq-3bit"].code
    assert "mlxq/quant/" in variants["mlxq-gptq-q2_k"].code


def test_dynamic_quant_widths_bracket_the_mix():
    """Dynamic quant's widths are the pair whose uniform models bracket the mlxq mix's bits (mlx-lm's count): 2/3
    bits cannot reach q2_k's 4.145 (3.638 in the bench's count), 3/4 can."""
    qq = quant_quality()
    assert qq.dynamic_bits(4.1454) == (3, 4)  # mlxq's q2_k on SmolLM2
    assert qq.dynamic_bits(4.9429) == (3, 4)  # q3_k_m
    assert qq.dynamic_bits(3.7) == (2, 3)
    with pytest.raises(ValueError, match="bracket"):
        qq.dynamic_bits(2.5)


def test_resume_reruns_a_variant_whose_inputs_changed(code_root, tmp_path):
    """quant_quality's loop: with --resume a matching stored result is taken (the variant is not run); a stored
    result under other inputs is not, and neither is anything without --resume."""
    from mlxq.bench.store import VariantStore

    qq = quant_quality()
    calls = []

    def runner(out, results):
        calls.append(out)
        raise RuntimeError("ran")  # stops before scoring: only whether it ran matters here

    variants = [qq.Variant("mlxq-gptq-3bit", 3, runner, code=CODE)]
    stored = {"bits": 3, "kl": 0.7, "bpw": 3.5}
    VariantStore(tmp_path / "results", INPUTS, code_root).put("mlxq-gptq-3bit", stored, None, CODE)

    def run(inputs, resume):
        results, reused = {}, {}
        qq.measure(variants, results, reused, VariantStore(tmp_path / "results", inputs, code_root), resume,
                   None, None, {}, tmp_path / "work")
        return results, reused

    results, reused = run(INPUTS, resume=True)
    assert results == {"mlxq-gptq-3bit": stored} and list(reused) == ["mlxq-gptq-3bit"] and not calls
    results, reused = run({**INPUTS, "eval": "f" * 64}, resume=True)
    assert results["mlxq-gptq-3bit"]["failed"] == "RuntimeError: ran" and not reused and len(calls) == 1
    results, reused = run(INPUTS, resume=False)
    assert "failed" in results["mlxq-gptq-3bit"] and not reused and len(calls) == 2


def test_only_keeps_the_given_order_and_what_a_variant_needs(tmp_path):
    qq = quant_quality()
    everything = qq.plan(False, tmp_path, [], "", tmp_path)
    chosen = [v.label for v in qq.select(everything, ["mlx_lm-*-3bit", "mlx_lm-dynamic-q2_k", "*-2bit"])]
    assert chosen[:4] == ["mlx_lm-rtn-3bit", "mlx_lm-awq-3bit", "mlx_lm-dwq-3bit", "mlxq-gptq-q2_k"]
    assert chosen[4] == "mlx_lm-dynamic-q2_k" and set(chosen[5:]) == {v.label for v in everything
                                                                        if v.label.endswith("-2bit")}
    assert [v.label for v in qq.select(everything, None)] == [v.label for v in everything]
    with pytest.raises(SystemExit, match="matches no variant"):
        qq.select(everything, ["mlx_lm-gptq-3bit"])


def test_no_best_peer_while_a_peer_of_that_width_is_missing():
    qq = quant_quality()
    results = {"mlxq-gptq-3bit": {"bits": 3, "kl": 0.6, "bpw": 3.5},
               "mlx_lm-rtn-3bit": {"bits": 3, "kl": 2.0, "bpw": 3.5},
               "mlx_lm-awq-3bit": {"bits": 3, "kl": 1.0, "bpw": 3.5}}
    ratios, best = qq.compare(results, calibrated_peers=True, not_measured={"mlx_lm-dwq-3bit": 3})
    assert ratios == {"kl_3bit_vs_mlx_lm_rtn": 0.3, "kl_3bit_vs_mlx_lm_awq": 0.6} and best == {}
    ratios, best = qq.compare(results, calibrated_peers=True, not_measured={})
    assert ratios["kl_3bit_vs_best_peer"] == 0.6 and best["3bit"]["peer"] == "mlx_lm-awq-3bit"
    assert best["3bit"]["goal_met"]


def test_dequantized_matmul_is_the_quantized_function_and_its_gradients():
    """DWQ's quantized matmuls computed in float (quant_quality.dequantized_matmul): the same outputs and the same
    gradients with respect to the trained scales and biases as MLX's quantized matmul, for a QuantizedLinear and a
    tied QuantizedEmbedding used as the output layer; MLX's own op is back afterwards."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    qq = quant_quality()
    mx.random.seed(0)
    linear = nn.QuantizedLinear.from_linear(nn.Linear(128, 96, bias=True), group_size=64, bits=3)
    embedding = nn.QuantizedEmbedding.from_embedding(nn.Embedding(80, 128), group_size=64, bits=3)
    for layer in (linear, embedding):
        layer.unfreeze(keys=["scales", "biases"], recurse=False)
    x = mx.random.normal((2, 5, 128))

    def outputs_and_grads(layer, call):
        loss = nn.value_and_grad(layer, lambda x: (call(x) ** 2).sum())
        value, grads = loss(x)
        return call(x), value, dict(tree_flatten(grads))

    original = mx.quantized_matmul
    for layer, call in ((linear, linear), (embedding, embedding.as_linear)):
        quantized = outputs_and_grads(layer, call)
        with qq.dequantized_matmul():
            assert mx.quantized_matmul is not original
            dense = outputs_and_grads(layer, call)
        assert mx.quantized_matmul is original
        assert set(quantized[2]) == set(dense[2]) >= {"scales", "biases"}
        assert mx.allclose(quantized[0], dense[0], rtol=1e-4, atol=1e-4)
        assert mx.allclose(quantized[1], dense[1], rtol=1e-4)
        for name in quantized[2]:
            assert mx.allclose(quantized[2][name], dense[2][name], rtol=1e-3, atol=1e-3), name
            assert mx.abs(quantized[2][name]).max().item() > 0, name  # a gradient that is really there


def test_dequantized_matmul_check_on_a_model(monkeypatch):
    """The in-run check passes on a quantized mlx-lm model and fails when the float path computes something else."""
    import mlx.nn as nn
    from mlx_lm.models import llama

    qq = quant_quality()
    mx.random.seed(1)
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96,
                           tie_word_embeddings=True)
    model = llama.Model(args)
    nn.quantize(model, group_size=64, bits=3)
    check = qq.check_dequantized_matmul(model, list(range(1, 17)))
    assert check["tokens"] == 16 and check["max_abs_logit_diff"] <= 1e-3 * check["max_abs_logit"]
    dequantize = mx.dequantize
    monkeypatch.setattr(mx, "dequantize", lambda *a, **k: dequantize(*a, **k) * 1.01)  # a float path 1 % off
    with pytest.raises(ValueError, match="differs from MLX's quantized matmul"):
        qq.check_dequantized_matmul(model, list(range(1, 17)))


def test_dynamic_threshold_fills_the_target_exactly():
    """The peer's threshold puts the most sensitive layers at the high width, as many as fit within the target bits
    per weight (mlx-lm's count): at most the target, one layer more would pass it, and never fewer bits than mlx-lm's
    own bisection reaches within the target."""
    import copy

    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.quant.dynamic_quant import estimate_threshold
    from mlx_lm.utils import compute_bits_per_weight

    qq = quant_quality()
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=4, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96,
                           tie_word_embeddings=True)
    model = llama.Model(args)
    paths = [p for p, m in model.named_modules() if hasattr(m, "to_quantized")]
    sens = {p: float(i) ** 3 for i, p in enumerate(paths)}  # heavy-tailed, like real sensitivities

    def bpw_at(threshold: float) -> float:
        q = copy.deepcopy(model)
        nn.quantize(q, group_size=64, bits=3, class_predicate=lambda p, m: hasattr(m, "to_quantized") and (
            {"bits": 4, "group_size": 64} if sens[p] > threshold else True))
        return float(compute_bits_per_weight(q))

    low, high = bpw_at(float("inf")), bpw_at(-1.0)
    for target in (low + 0.3 * (high - low), low + 0.77 * (high - low)):
        threshold, bpw = qq.dynamic_threshold(model, sens, target, 3, 4)
        assert bpw == bpw_at(threshold) <= target
        above = sorted(v for v in sens.values() if v <= threshold)[-1]  # the next layer to move up
        assert bpw_at(above - 1e-9) > target
        theirs = bpw_at(estimate_threshold(model, sens, target, 3, 64, 4, 64))  # its midpoint may also overshoot
        assert bpw >= theirs or theirs > target


# ------------------------------------------------------------------------------------------------- prefill_hybrid
TINY_HYBRID = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                   linear_value_head_dim=32, vocab_size=256, intermediate_size=256, moe_intermediate_size=64,
                   shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=3)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prefill_hybrid_runs_llama_cpp_on_the_same_weights(kind, tmp_path):
    """The bench's three sides on a scaled-down hybrid: llama.cpp's logits on the exported F32 GGUF agree with
    mlx-lm's as mlxq's do (the run fails otherwise), and every side is timed."""
    bench = bench_script("prefill_hybrid")
    config = {**bench.CONFIGS[kind], **{k: v for k, v in TINY_HYBRID.items() if k in bench.CONFIGS[kind]}}
    result = bench.run(kind, config, 24, 2, 1, tmp_path)
    assert 0 < result["llama_cpp_max_rel_logit_diff_vs_mlx_lm"] <= bench.TOLERANCE
    assert result["llama_cpp_threads"] >= 1
    for figures in (result["prefill_tps"], result["decode_tps"]):
        assert set(figures) == {"mlxq", "mlx_lm", "llama_cpp"} and all(v > 0 for v in figures.values())


def test_prefill_hybrid_fails_when_llama_cpp_disagrees(tmp_path, monkeypatch):
    """A llama.cpp side off by one position (logits of the next token) stops the run before anything is timed."""
    bench = bench_script("prefill_hybrid")
    config = {**bench.CONFIGS["dense"], **{k: v for k, v in TINY_HYBRID.items() if k in bench.CONFIGS["dense"]}}
    logits = bench.llama_cpp_logits
    monkeypatch.setattr(bench, "llama_cpp_logits", lambda path, tokens: logits(path, tokens[1:] + tokens[:1]))
    with pytest.raises(SystemExit, match="llama_cpp's logits differ from mlx-lm's"):
        bench.run("dense", config, 24, 2, 1, tmp_path)


def test_dwq_runner_on_a_tiny_model(tmp_path):
    """quant_quality's mlx-lm DWQ runner end to end on a tiny llama (one optimizer step of 4 sequences): the check on
    the student passes, gradient checkpointing is on and recorded, and mlx-lm loads the 3-bit result."""
    from mlx_lm.utils import load
    from tiny import make_tiny, save_tiny_tokenizer

    qq = quant_quality()
    src = tmp_path / "llama"
    make_tiny("llama", src)
    save_tiny_tokenizer(src, 160)
    mx.random.seed(0)
    batches = mx.random.randint(0, 160, (4, qq.SEQ_LEN)).tolist()
    record = qq.run_mlx_lm_dwq(src, tmp_path / "dwq", 3, batches)
    assert record["steps"] == 1 and record["gradient_checkpoint"] is True
    check = record["dequantized_matmul_check"]
    assert check["tokens"] == 128 and check["max_abs_logit_diff"] <= check["tolerance"] * check["max_abs_logit"]
    assert json.loads((tmp_path / "dwq" / "config.json").read_text())["quantization"]["bits"] == 3
    model, _ = load(str(tmp_path / "dwq"))
    logits = model(mx.array([batches[0][:16]]))
    assert logits.shape == (1, 16, 160) and bool(mx.isfinite(logits).all())


def bench_experts():
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    import experts

    return experts


def test_each_decode_block_divides_by_the_ceilings_either_side_of_it():
    ceiling = lambda x: {"arm": "ceiling", "gb_per_s": x}  # noqa: E731
    block = lambda arm, x: {"arm": arm, "gb_per_s": x, "used_gb_per_s": x / 2}  # noqa: E731
    rows = [ceiling(1.0), block("a", 0.9), block("b", 0.6), ceiling(2.0), block("b", 1.2), block("a", 0.3),
            ceiling(0.5)]
    assert bench_experts().block_ratios(rows) == {"a": [0.6, 0.24], "b": [0.4, 0.96]}
    assert bench_experts().block_ratios(rows, "used_gb_per_s") == {"a": [0.3, 0.12], "b": [0.2, 0.48]}


def test_interleaved_read_rates_put_every_block_between_two_ceilings(made):  # noqa: F811
    _, _, packs = made("qwen3_moe")
    args = types.SimpleNamespace(top_k=0, threads=2)
    out = bench_experts().interleaved_read_rates(packs, list(range(3, 23)), 150, args, n_blocks=3, tokens=2,
                                                 ceiling_s=0.05)
    assert out["ok"], out
    arms = [r["arm"] for r in out["rows"]]
    # ceiling, the arms in an order that rotates from block to block, ceiling, ...
    assert arms == ["ceiling", "prefetch_0", "prefetch_1", "prefetch_1/0.3", "pattern",
                    "ceiling", "prefetch_1", "prefetch_1/0.3", "pattern", "prefetch_0",
                    "ceiling", "prefetch_1/0.3", "pattern", "prefetch_0", "prefetch_1", "ceiling"]
    rows = out["rows"]
    ceilings = [r["gb_per_s"] for r in rows if r["arm"] == "ceiling"]
    assert all(c > 0 for c in ceilings) and out["ceiling_gb_per_s"]["each"] == [round(c, 3) for c in ceilings]
    for arm in ("prefetch_0", "prefetch_1", "prefetch_1/0.3", "pattern"):
        mine = [r for r in rows if r["arm"] == arm]
        assert [r["block"] for r in mine] == [0, 1, 2] and all(r["reads"] > 0 for r in mine)
        want = [round(r["gb_per_s"] / ((ceilings[r["block"]] + ceilings[r["block"] + 1]) / 2), 3) for r in mine]
        assert out["read_vs_ceiling"][arm]["rounds"] == want
    assert all(r["misses"] > 0 and r["prefetch_reads"] == 0 for r in rows if r["arm"] == "prefetch_0")
    assert all(r["prefetch_reads"] > 0 for r in rows if r["arm"] in ("prefetch_1", "prefetch_1/0.3"))
    # the raw device replays the pattern of the block read 0 layers ahead just before it
    p0 = [r for r in rows if r["arm"] == "prefetch_0"]
    for r in (r for r in rows if r["arm"] == "pattern"):
        ref = p0[0] if r["block"] <= 1 else p0[1]  # (block 2 runs it before its own prefetch_0)
        assert r["batch"] == pytest.approx(ref["misses"] / (2 * len(open_pack_dir(packs).layers)))


@pytest.mark.parametrize("arms, message", [("prefetch_x", "'prefetch_x' is neither"),
                                           ("pattern,prefetch_0", "name prefetch_0 before it")])
def test_bad_interleaved_arms_are_one_line_errors(arms, message):
    with pytest.raises(SystemExit, match=message):
        bench_experts()._arms(types.SimpleNamespace(arms=arms), ())
    assert bench_experts()._arms(types.SimpleNamespace(arms=None), ("prefetch_0", "pattern")) == ("prefetch_0",
                                                                                                   "pattern")


def test_reads_after_idle_time_each_read_of_a_burst_after_its_gap(made, monkeypatch):  # noqa: F811
    """The after-idle probe: per gap, `bursts` idle gaps, each followed by `reads` single reads, timed one by one."""
    experts = bench_experts()
    packs = open_pack_dir(made("qwen3_moe")[2])
    slept, reads, real_sleep, real_preadv = [], [], experts.time.sleep, experts.os.preadv
    monkeypatch.setattr(experts.time, "sleep", lambda s: slept.append(s) or real_sleep(s))
    monkeypatch.setattr(experts.os, "preadv", lambda fd, bufs, off: reads.append(len(bufs[0])) or real_preadv(
        fd, bufs, off))
    out = experts.reads_after_idle(packs, gaps_s=(0.0, 0.002), bursts=3, reads=2)
    assert slept == [0.0] * 3 + [0.002] * 3
    assert reads == [next(iter(packs.layers.values())).stride] * 12
    assert list(out["ms_per_read_after_gap_ms"]) == ["0", "2"]
    assert all(len(ms) == 2 and all(m > 0 for m in ms) for ms in out["ms_per_read_after_gap_ms"].values())
