"""Dense families: mlxq logits equal transformers' (and mlx-lm's where it reads the checkpoint right)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from tiny import FAMILIES, make_tiny, to_old_style_rope

from mlxq.formats import open_checkpoint
from mlxq.loading import load_model

PROMPT = [3, 17, 42, 99, 5, 120, 7, 64, 11, 150, 33]
DECODE = [8, 19, 140, 2, 77, 45, 90, 13, 101, 66, 25, 38, 149, 4, 58, 71]  # 16 cached steps


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_tiny(request.param, path)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT + DECODE])).logits[0].numpy()
    return request.param, path, ref_logits


def test_prompt_logits_match_transformers(family):
    _, path, ref = family
    net = load_model(open_checkpoint(str(path)))
    out = net(mx.array([PROMPT]), net.make_cache())[0]
    assert rel(out, ref[: len(PROMPT)]) < 1e-4


def test_cached_decode_matches_transformers(family):
    _, path, ref = family
    net = load_model(open_checkpoint(str(path)))
    cache = net.make_cache()
    steps = [net(mx.array([PROMPT]), cache)[0, -1]]
    for tok in DECODE[:-1]:
        steps.append(net(mx.array([[tok]]), cache)[0, -1])
    assert rel(mx.stack(steps), ref[len(PROMPT) - 1 : -1]) < 1e-4


@pytest.mark.parametrize("name", ["llama", "llama_tied_linear", "qwen3", "qwen3_moe", "mixtral"])
def test_same_logits_as_mlx_lm(name, tmp_path):
    """mlx-lm 0.32 is a second, independent implementation to agree with. It reads only the old-style
    rope fields (it ignores transformers-5 `rope_parameters`) and cannot load gemma3_text, so it gets the
    config in the style it reads."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    make_tiny(name, tmp_path)
    to_old_style_rope(tmp_path)
    theirs, _ = mlx_lm_load_model(tmp_path)
    ours = load_model(open_checkpoint(str(tmp_path)))
    tokens = mx.array([PROMPT])
    assert rel(ours(tokens, ours.make_cache()), theirs(tokens)) < 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_old_style_rope_config_reads_the_same(name, tmp_path):
    """`rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (5) are the same model."""
    ref = make_tiny(name, tmp_path)
    to_old_style_rope(tmp_path)
    net = load_model(open_checkpoint(str(tmp_path)))
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0].numpy()
    assert rel(net(mx.array([PROMPT]), net.make_cache())[0], want) < 1e-4


def test_loading_peaks_near_the_model_size(tmp_path):
    """Loading reads, fuses, lays out and frees the checkpoint one parameter at a time, so MLX's peak allocation
    stays near the loaded model's size. (All evaluated at once, every checkpoint array and its replacement were
    alive together: twice the model, what `mlxq bench --vs mlx-lm` showed against mlx-lm.)"""
    from mlx.utils import tree_flatten

    make_tiny("llama", tmp_path, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, vocab_size=2048)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    net = load_model(open_checkpoint(str(tmp_path)))
    peak = mx.get_peak_memory() - before
    size = sum(p.nbytes for _, p in tree_flatten(net.parameters()))
    assert peak < 1.25 * size, f"loading peaked at {peak / size:.2f}x the model's {size / 1e6:.1f} MB"
