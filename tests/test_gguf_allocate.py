"""`--method allocate`: types moved within a mix by the Fisher-weighted error, at the mix's own size.

The Fisher diagonal is checked against finite differences of the loss; the allocation against an exhaustive search
on small random problems (never over budget, never worse than the mix's own types); the export end to end on a
tiny model against the plain importance-weighted export (no more bits, lower KL to the float model on the
calibration text) and against llama.cpp, which loads the file and gives mlxq's logits.
"""

from __future__ import annotations

import itertools

import gguf
import mlx.core as mx
import numpy as np
import pytest
from llama_cpp_run import llama_cpp_logits
from test_gguf_export import PROMPT, QUANTIZED_TOLERANCE, TEXT, mlxq_logits, mlxq_net, rel
from tiny import WIDE, make_tiny, save_tiny_tokenizer

from mlxq.formats import open_checkpoint
from mlxq.formats.gguf import allocate
from mlxq.formats.gguf.export import export
from mlxq.loading import load_model
from mlxq.quant.recipes import gguf_recipe


def test_fisher_is_the_sum_of_squared_gradients(tmp_path):
    make_tiny("llama", tmp_path)
    net = load_model(open_checkpoint(str(tmp_path)), dtype=mx.float32, fuse=False)
    seqs = [[3, 17, 42, 99, 5, 120, 7], [64, 11, 150, 33, 8, 19, 140]]
    fisher = allocate.fisher_diagonal(net, seqs)
    name, (i, j) = "model.layers.0.mlp.down_proj.weight", (2, 5)
    assert name in fisher
    w = net.model.layers[0].mlp.down_proj.weight

    def loss(seq, delta):
        w2 = mx.array(np.asarray(w))
        w2[i, j] = w2[i, j] + delta
        net.model.layers[0].mlp.down_proj.weight = w2
        t = mx.array(seq)
        logits = net(t[None, :-1], net.make_cache())[0]
        out = mx.mean(mx.logsumexp(logits, -1) - mx.take_along_axis(logits, t[1:, None], -1)[:, 0]).item()
        net.model.layers[0].mlp.down_proj.weight = w
        return out

    eps = 1e-2
    want = sum(((loss(s, eps) - loss(s, -eps)) / (2 * eps)) ** 2 for s in seqs)
    assert fisher[name][i, j].item() == pytest.approx(want, rel=2e-2, abs=1e-9)


def test_steps_are_the_neighbours_on_the_row_width_ladder():
    assert allocate.steps("Q3_K", 512) == ("Q2_K", "Q3_K", "Q4_K")
    assert allocate.steps("Q2_K", 512) == ("Q2_K", "Q3_K")
    assert allocate.steps("Q8_0", 512) == ("Q6_K", "Q8_0")
    assert allocate.steps("Q4_0", 576) == ("Q4_0", "Q5_0")
    assert allocate.steps("Q5_1", 576) == ("Q4_0", "Q5_0", "Q5_1", "Q8_0")  # from where Q5_0 stands
    assert allocate.steps("F16", 512) == ("F16",)
    assert allocate.steps("TQ2_0", 512) == ("TQ2_0",)


def _cost(choices, pick):
    return sum(c.options[pick[c.name]][1] for c in choices), sum(c.options[pick[c.name]][0] for c in choices)


@pytest.mark.parametrize("seed", range(20))
def test_allocation_keeps_the_budget_and_is_near_the_exhaustive_best(seed):
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
    assert cost <= best + 0.5 * (start_cost - best) + 1e-12  # at least half of the possible gain


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


def test_error_estimated_on_sampled_rows_is_the_whole_tensors():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2048, 256)).astype(np.float32)
    fisher = rng.exponential(1.0, w.shape).astype(np.float32)
    full = allocate.weighted_errors(w, fisher, ("Q3_K", "Q5_K"), None, rows=2048)
    sampled = allocate.weighted_errors(w, fisher, ("Q3_K", "Q5_K"), None, rows=256)
    for k in full:
        assert sampled[k] == pytest.approx(full[k], rel=0.1)
    assert full["Q5_K"] < full["Q3_K"] / 3  # two more bits, about a sixteenth of the squared error
