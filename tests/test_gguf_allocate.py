"""`--method allocate`: types moved within a mix by the KL each move measurably adds, at the mix's own size.

The layer-by-layer KL of many variants at once is checked against whole forward passes with the variants' weights
(the exported file's own types included); the choice on a measure with known costs (the best pick, within the
budget; the mix kept when the moves do not add up); the allocation against an exhaustive search on small random
problems (never over budget, never worse than the mix's own types); the export end to end on a tiny model against
the plain importance-weighted export (no more bits, lower KL to the float model on the calibration text) and against
llama.cpp, which loads the file and gives mlxq's logits.
"""

from __future__ import annotations

import itertools
import os
import signal
import tempfile
import time
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from llama_cpp_run import llama_cpp_logits
from test_gguf_export import PROMPT, QUANTIZED_TOLERANCE, TEXT, mlxq_logits, mlxq_net, rel, tiny_src  # noqa: F401
from tiny import WIDE, make_tiny, save_tiny_tokenizer

from mlxq.formats import open_checkpoint
from mlxq.formats.gguf import allocate
from mlxq.formats.gguf.codecs import CODECS, bits_per_weight, encode
from mlxq.formats.gguf.export import export, plan, requantized, trial_encoders
from mlxq.loading import load_model
from mlxq.quant.recipes import gguf_recipe


def test_a_tensor_moves_along_its_row_widths_ladder():
    t = lambda kind, cols: allocate.Tensor("w", "g", kind, cols, cols)  # noqa: E731
    assert [t("Q3_K", 512).at(o) for o in (-1, 0, 1, 2)] == ["Q2_K", "Q3_K", "Q4_K", "Q5_K"]
    assert [t("Q2_K", 512).at(o) for o in (-1, 0, 1)] == ["Q2_K", "Q2_K", "Q3_K"]
    assert [t("Q8_0", 512).at(o) for o in (-1, 0, 1)] == ["Q6_K", "Q8_0", "Q8_0"]
    assert [t("Q5_0", 576).at(o) for o in (-1, 1, 2)] == ["IQ4_NL", "Q8_0", "Q8_0"]
    assert [t("Q4_0", 576).at(o) for o in (-1, 0, 1, 2)] == ["IQ4_NL", "Q4_0", "Q5_0", "Q8_0"]  # IQ4_NL's rung
    assert [t("Q5_1", 576).at(o) for o in (-1, 0, 1)] == ["IQ4_NL", "Q5_1", "Q8_0"]  # from where Q5_0 stands
    assert t("Q4_1", 512).at(1) == "Q4_1"  # no twin on the K-quants' ladder: stays
    assert t("F16", 512).at(1) == "F16" and t("TQ2_0", 512).at(1) == "TQ2_0"


def measured_reference(src, variant, weights, batches):
    """KL(float || variant) by the whole model's forward pass: the float net against the net with the variant's
    tensors replaced (the file's own weights when `variant` is None)."""
    float_net = load_model(open_checkpoint(str(src)), dtype=mx.float32, fuse=False)
    net = load_model(open_checkpoint(str(src)), dtype=mx.float32, fuse=False)
    net.load_weights(list(zip(variant, weights(list(variant.items())), strict=True)), strict=False)
    total = 0.0
    for seq in batches:
        t = mx.array([seq])
        ref = float_net(t, float_net.make_cache())[0]
        ref = ref - mx.logsumexp(ref, -1, keepdims=True)
        lp = net(t, net.make_cache())[0]
        total += (mx.exp(ref) * (ref - lp + mx.logsumexp(lp, -1, keepdims=True))).sum().item()
    return total / sum(len(s) for s in batches)


def test_measured_kl_layer_by_layer_is_the_whole_models(tmp_path):
    """Every variant at once, layer by layer, against one whole forward pass per variant: the file's types on
    every tensor (tied embedding included), and one tensor alone measured after it (so a variant that inherits the
    one before's weights shows)."""
    src = tmp_path / "src"
    make_tiny("llama_tied_linear", src, **WIDE)
    ckpt = open_checkpoint(str(src))
    the_plan = plan(ckpt, gguf_recipe("Q3_K_M"))
    items = {it.hf: it for it in the_plan.items if it.out.kind in CODECS}
    full = {n: it.out.kind for n, it in items.items()}
    assert "model.embed_tokens.weight" in full and len(set(full.values())) > 1
    one = {"model.layers.1.mlp.down_proj.weight": "Q2_K"}

    def weights(wanted):
        with trial_encoders(0, 0) as encoders:
            made = requantized(open_checkpoint(str(src)), the_plan, [(items[n], k) for n, k in wanted], None, encoders)
        return [mx.array(w) for w, _ in made]

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 160, 48).tolist() for _ in range(3)]
    got = allocate.measured_kl(open_checkpoint(str(src)), batches, [full, one], weights)
    want = [measured_reference(src, v, weights, batches) for v in (full, one)]
    assert got == pytest.approx(want, rel=1e-3)
    assert want[0] > 2 * want[1] > 0


def test_candidates_are_encoded_by_the_workers_as_here(tmp_path, monkeypatch):
    """`requantized` hands every candidate to the workers before reading any back: the same weights and errors, bit
    for bit, as encoded in this process, and each the error of that tensor at that type (so each was read back from
    its own place in the scratch file)."""
    from mlxq.formats.gguf import parallel
    from mlxq.kernels.kquants import dequantize

    src = tmp_path / "src"
    make_tiny("llama", src, **WIDE)
    ckpt = open_checkpoint(str(src))
    the_plan = plan(ckpt, gguf_recipe("Q3_K_M"))
    items = [it for it in the_plan.items if it.out.kind in CODECS and ".layers.1." in it.hf]
    wanted = [(it, kind) for it in items for kind in ("Q2_K", "Q4_K", "Q8_0")]
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", 4 * 256)  # every tensor in several slices
    made = {}
    for workers in (0, 2):
        with trial_encoders(workers, max(it.out.shape[-1] for it in items)) as encoders:
            made[workers] = requantized(open_checkpoint(str(src)), the_plan, wanted, None, encoders)
    for (w0, e0), (w2, e2) in zip(made[0], made[2], strict=True):
        assert e0 == e2 and np.array_equal(w0, w2)
    for (item, kind), (_, error) in zip(wanted, made[0], strict=True):
        w = item.source.as_gguf(ckpt, the_plan.arch, item.hf, the_plan.config).reshape(item.out.shape)
        q = np.asarray(dequantize(mx.array(encode(w, kind)), kind)).reshape(w.shape)
        assert error == pytest.approx(float(((w - q) ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_allocation_leaves_no_scratch_no_worker_no_file(how, tmp_path, monkeypatch):
    import mlxq.formats.gguf.export as export_module

    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path / "cache"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    src = tmp_path / "src"
    make_tiny("llama", src, **WIDE)
    save_tiny_tokenizer(src, 160)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    real, workers = export_module.requantized, []

    def interrupted(ckpt, the_plan, wanted, stats, encoders):
        if not workers:  # the first layer's candidates go through; the next ask is interrupted
            workers.extend(w.pid for w in encoders.workers)
            return real(ckpt, the_plan, wanted, stats, encoders)
        assert len(list(scratch.glob("mlxq-trial-*"))) == 1  # the scratch file is there while the pass runs
        if how == "ctrl-c":
            raise KeyboardInterrupt
        assert callable(signal.getsignal(signal.SIGTERM))  # (else the signal below would end the test run)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # its handler raises SystemExit before this returns

    monkeypatch.setattr(export_module, "requantized", interrupted)
    out = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else SystemExit):
        export(str(src), out, gguf_recipe("Q3_K_M"), calibrate=str(text), calib_tokens=1024, progress=False,
               workers=2)
    assert len(workers) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert list(scratch.glob("mlxq-trial-*")) == [] and not out.exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back


def table_measure(costs, interaction=0.0):
    """A measure whose KL is the sum of each tensor's cost at its type, plus `interaction` once two or more tensors
    sit off their first type (the mix's), as a measure that does not add up would; records what it was asked."""
    asked = []

    def measure(variants):
        asked.append(variants)
        out = []
        for v in variants:
            off = sum(k != next(iter(costs[n])) for n, k in v.items())
            out.append(sum(costs[n][k] for n, k in v.items()) + (interaction if off >= 2 else 0.0))
        return out

    return measure, asked


def test_choice_moves_bits_where_they_lower_the_kl_and_keeps_the_budget():
    """The class-level cliff (ffn_down) is measured; which ffn_down takes the extra bits is told by the errors: the
    budget pays for one of them only (moving the whole class costs more than the others can give back)."""
    n = 512 * 64
    tensors = [allocate.Tensor("down0", "ffn_down", "Q3_K", 512, n),
               allocate.Tensor("down1", "ffn_down", "Q3_K", 512, n),
               allocate.Tensor("up", "ffn_up", "Q4_K", 512, n), allocate.Tensor("v", "attn_v", "Q6_K", 512, n // 2)]
    costs = {"down0": {"Q3_K": 0.30, "Q2_K": 0.9, "Q4_K": 0.01, "Q5_K": 0.005},
             "down1": {"Q3_K": 0.002, "Q2_K": 0.004, "Q4_K": 0.001, "Q5_K": 0.0005},
             "up": {"Q4_K": 0.02, "Q3_K": 0.05, "Q5_K": 0.015, "Q6_K": 0.012},
             "v": {"Q6_K": 0.001, "Q5_K": 0.002, "Q8_0": 0.0009}}
    error = lambda name, kind: 7.0 * costs[name][kind]  # noqa: E731  (shares need only be proportional)
    measure, asked = table_measure(costs)
    pick = allocate.choose(measure, tensors, error)
    assert pick == {"down0": "Q4_K", "down1": "Q2_K", "up": "Q4_K", "v": "Q5_K"}  # the exhaustive best
    bits = lambda p: sum(t.size * bits_per_weight(p[t.name]) for t in tensors)  # noqa: E731
    assert bits(pick) <= bits({t.name: t.kind for t in tensors})
    assert len(asked) == 2 and pick in asked[1]  # one pass over every move, one to check the picks
    # when the moves do not add up and the picks are worse than the mix as a whole, the mix stays
    measure, _ = table_measure(costs, interaction=1.0)
    assert allocate.choose(measure, tensors, error) == {t.name: t.kind for t in tensors}


def test_a_groups_measured_kl_is_shared_as_its_tensors_errors_change():
    group = [allocate.Tensor(f"t{i}", "g", "Q4_0", 576, 576) for i in range(3)]
    err = {("t0", "Q4_0"): 4.0, ("t0", "Q5_0"): 1.0, ("t1", "Q4_0"): 2.0, ("t1", "Q5_0"): 1.0,
           ("t2", "Q4_0"): 1.0, ("t2", "Q5_0"): 1.5}  # t2 got worse: it takes no part
    got = allocate.shares(group, 1, lambda n, k: err[n, k])
    assert [got[t] for t in group] == pytest.approx([0.75, 0.25, 0.0])


def _cost(choices, pick):
    return sum(c.options[pick[c.name]][1] for c in choices), sum(c.options[pick[c.name]][0] for c in choices)


@pytest.mark.parametrize("seed", range(20))
def test_allocation_keeps_the_budget_and_is_the_exhaustive_best(seed):
    rng = np.random.default_rng(seed)
    choices = []
    for n in range(6):
        bits = np.sort(rng.choice([2.6, 3.4, 4.5, 5.5, 6.6, 8.5], size=3, replace=False)) * rng.integers(1, 5)
        cost = np.sort(rng.exponential(1.0, 3))[::-1] * rng.exponential(1.0)  # more bits, less error
        choices.append(allocate.Choice(f"t{n}", {f"k{i}": (float(bits[i]), float(cost[i])) for i in range(3)},
                                       f"k{rng.integers(0, 3)}"))
    pick = allocate.allocate(choices)
    budget = sum(c.options[c.start][0] for c in choices)
    cost, bits = _cost(choices, pick)
    assert bits <= budget + 1e-9
    start_cost = _cost(choices, {c.name: c.start for c in choices})[0]
    assert cost <= start_cost + 1e-12
    best = min(
        _cost(choices, dict(zip([c.name for c in choices], combo, strict=True)))[0]
        for combo in itertools.product(*[list(c.options) for c in choices])
        if _cost(choices, dict(zip([c.name for c in choices], combo, strict=True)))[1] <= budget + 1e-9
    )
    assert cost == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_one_big_cheap_step_does_not_crowd_out_the_best_pair():
    """SmolLM2's Q4_K_M classes as measured (Mbit, KL change): a greedy by KL saved per bit bought attn_k/o/q at
    Q8_0 with token_embd's step down (-0.0074); the best is attn_q in IQ4_NL paying for attn_v in Q8_0 (-0.0123)."""
    measured = {"token_embd": {"-1": (155.71, 0.01632)},
                "attn_k": {"-1": (14.93, 0.00116), "+0": (18.25, 0.0), "+1": (28.2, -0.00357)},
                "attn_output": {"-1": (44.79, 0.00869), "+0": (54.74, 0.0), "+1": (84.6, -0.00327)},
                "attn_q": {"-1": (44.79, 0.00201), "+0": (54.74, 0.0), "+1": (84.6, -0.00258)},
                "attn_v": {"-1": (16.48, 0.00749), "+0": (22.89, 0.0), "+1": (28.2, -0.01432)}}
    measured["token_embd"]["+0"] = (240.65, 0.0)
    pick = allocate.allocate([allocate.Choice(g, opts, "+0") for g, opts in measured.items()])
    assert pick == {"token_embd": "+0", "attn_k": "+0", "attn_output": "+0", "attn_q": "-1", "attn_v": "+1"}


def test_bits_move_to_where_they_lower_the_cost_most():
    choices = [
        allocate.Choice("sensitive", {"Q3_K": (344.0, 10.0), "Q4_K": (450.0, 1.0)}, "Q3_K"),
        allocate.Choice("robust", {"Q6_K": (656.0, 0.2), "Q8_0": (850.0, 0.1)}, "Q8_0"),
    ]
    assert allocate.allocate(choices) == {"sensitive": "Q4_K", "robust": "Q6_K"}


def quantized_bits(path) -> int:
    return sum(8 * int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.tensor_type.name not in ("F32", "F16"))


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K_M"])
def test_allocated_export_is_no_larger_and_closer_to_the_float_model(kind, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from mlxq.eval.metrics import reference, score, windows

    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    make_tiny("llama", src, **WIDE)
    save_tiny_tokenizer(src, 160)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    files = {}
    for method in ("imatrix", "allocate"):
        files[method] = tmp_path / f"{kind}-{method}.gguf"
        export(str(src), files[method], gguf_recipe(kind), calibrate=str(text), method=method, calib_tokens=1024,
               progress=False)
    # the candidates and the file encoded by two worker processes: the same choice, the same bytes
    spread = tmp_path / f"{kind}-allocate-workers.gguf"
    export(str(src), spread, gguf_recipe(kind), calibrate=str(text), calib_tokens=1024, progress=False, workers=2)
    assert spread.read_bytes() == files["allocate"].read_bytes()
    kinds = {m: {t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors} for m, p in files.items()}
    assert kinds["allocate"] != kinds["imatrix"]  # something moved
    assert quantized_bits(files["allocate"]) <= quantized_bits(files["imatrix"])
    float_net = load_model(open_checkpoint(str(src)), dtype=mx.float32)
    wins = windows(AutoTokenizer.from_pretrained(src).encode(TEXT), 128, 1024)

    def logits(net):
        return lambda ids: net(mx.array([ids]), net.make_cache())[0]

    ref = reference(logits(float_net), wins)
    kl = {m: score(logits(mlxq_net(p, src)), wins, ref).kl for m, p in files.items()}
    assert kl["allocate"] < kl["imatrix"], kl
    assert rel(llama_cpp_logits(files["allocate"], PROMPT), mlxq_logits(files["allocate"], src)) <= QUANTIZED_TOLERANCE


@pytest.mark.parametrize("family", ["qwen3_5_text", "gemma3", "qwen3_moe_norm"])
def test_allocated_export_on_other_families(family, tiny_src, tmp_path, monkeypatch):  # noqa: F811
    """The layer-by-layer pass on a hybrid (DeltaNet), Gemma 3 (sliding window, embedding scale) and an MoE (whose
    stacked experts keep the mix's types): no more bits than the mix, and llama.cpp gives mlxq's logits."""
    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    src = tiny_src(family, True)
    files = {m: tmp_path / f"{m}.gguf" for m in ("imatrix", "allocate")}
    for method, path in files.items():
        export(str(src), path, gguf_recipe("Q3_K_M"), calibrate=str(text), method=method, calib_tokens=1024,
               progress=False)
    assert quantized_bits(files["allocate"]) <= quantized_bits(files["imatrix"])
    assert rel(llama_cpp_logits(files["allocate"], PROMPT), mlxq_logits(files["allocate"], src)) <= QUANTIZED_TOLERANCE
