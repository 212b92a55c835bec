"""`mlxq quantize` and `mlxq eval` on tiny random models: packing, methods, roles, recipes, round trips through
mlx-lm and mlxq, calibration, evaluation and the command line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import make_tiny, save_tiny_tokenizer, to_old_style_rope

from mlxq.errors import InvalidRequest
from mlxq.formats import open_checkpoint
from mlxq.quant import affine, pipeline
from mlxq.quant.gptq import gptq
from mlxq.quant.recipes import BITS, FLOORS, RECIPES, Where, make_recipe, parse_overrides, uniform
from mlxq.quant.roles import ROLES, expand, in_mtp, layer_of, role_of

PROMPT = [3, 17, 42, 99, 5, 120, 7, 64, 11, 150, 33, 8, 19, 140, 2, 77]
TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs!\n") * 40


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def add_tokenizer(path: Path, vocab_size: int = 160) -> None:
    """A character-level tokenizer that fits the tiny models' 160-token vocabulary (mlx_lm.load and mlxq.load
    both want one)."""
    from mlxq.bench.synthetic import char_tokenizer

    char_tokenizer(path, vocab_size)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Tiny models with tokenizers, built once: name -> directory."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            if name.startswith("qwen3_5") or name == "qwen3_next":
                from test_hybrid import make_tiny as make_hybrid

                make_hybrid(name, path)
            else:
                make_tiny(name, path)
                if not name.startswith("gemma3"):
                    to_old_style_rope(path)
            save_tiny_tokenizer(path, 160)
            made[name] = path
        return made[name]

    return get


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        h.update(f.name.encode() + f.read_bytes() + str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()


def dequantized_copy(out: Path, dest: Path, src: Path) -> Path:
    """An HF float32 directory (`src`'s config) holding the numbers of the quantized directory `out`: each quantized
    tensor through MLX's own `mx.dequantize` with its bits and group size from `out`'s config, the rest as stored.
    With transformers on top, a reference for `out` that shares no code with mlxq."""
    quant = json.loads((out / "config.json").read_text())["quantization"]
    stored = {}
    for shard in out.glob("model*.safetensors"):
        stored.update(mx.load(str(shard)))
    weights = {}
    for name, w in stored.items():
        module = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")):
            continue
        if module + ".scales" in stored:
            spec = quant.get(module, quant)
            scales, biases = (stored[f"{module}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
            w = mx.dequantize(w, scales, biases, group_size=spec["group_size"], bits=spec["bits"])
        weights[name] = w.astype(mx.float32)
    dest.mkdir()
    (dest / "config.json").write_text((src / "config.json").read_text())
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "pt"})
    return dest


def transformers_logits(path: Path, tokens: list[list[int]]) -> np.ndarray:
    """Logits [batch, len, vocab] of the transformers class the directory's config names."""
    import torch
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.double().numpy()


# ---------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_mx_quantize(bits):
    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    codes = mx.round(
        (mx.dequantize(q, s, b, group_size=64, bits=bits).reshape(8, 4, 64) - b[..., None]) / s[..., None]
    ).reshape(8, 256)
    assert mx.array_equal(affine.pack(codes.astype(mx.uint32), bits), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_search_beats_rtn_on_weighted_error(bits):
    w = mx.random.normal((256, 512), key=mx.random.key(0)) * 0.05
    h = mx.exp(1.5 * mx.random.normal((512,), key=mx.random.key(1)))

    def err(q):
        return float((h * (affine.dequantize(q, bits, 64) - w) ** 2).mean())

    rtn = affine.quantize(w, bits, 64)
    assert mx.array_equal(rtn.weight, mx.quantize(w.astype(mx.float16), group_size=64, bits=bits)[0])
    assert err(affine.quantize(w, bits, 64, h, "search")) < 0.8 * err(rtn)


def test_gptq_beats_search_on_output_error():
    cols = 256
    key = mx.random.key(2)
    w = mx.random.normal((128, cols), key=key) * 0.05
    x = mx.random.normal((2048, cols), key=mx.random.key(3)) @ (
        mx.eye(cols) + 0.3 * mx.random.normal((cols, cols), key=mx.random.key(4))
    )
    hess = x.T @ x / x.shape[0]

    def out_err(q):
        d = (affine.dequantize(q, 3, 64) - w) @ x.T
        return float((d * d).mean())

    searched = affine.quantize(w, 3, 64, mx.diagonal(hess), "search")
    assert out_err(gptq(w, hess, 3, 64)) < 0.75 * out_err(searched)


def test_ternary_is_absmean_per_output_channel():
    """Codes by BitNet's absmean rule; the per-row scale refit by least squares, so weights that already are
    ternary times a scale come back exactly."""
    from mlxq.kernels.ternary import unpack

    w = mx.random.normal((4, 128), key=mx.random.key(5))
    q = affine.ternary(w)
    codes = unpack(q.weight, 128, "tq2").astype(mx.float32)
    alpha = mx.abs(w).mean(axis=-1, keepdims=True)
    assert mx.array_equal(codes, mx.clip(mx.round(w / alpha), -1, 1))
    ls = (w * codes).sum(-1) / mx.abs(codes).sum(-1)
    assert mx.allclose(q.scales.astype(mx.float32), ls, rtol=1e-3)
    exact = mx.array([[0.5], [2.0]]) * mx.clip(mx.round(w[:2]), -1, 1)
    again = affine.ternary(exact)
    assert mx.array_equal(unpack(again.weight, 128, "tq2").astype(mx.float32) * again.scales[:, None], exact)


# ---------------------------------------------------------------------------------------------- roles
HYBRIDS = ["qwen3_5_text", "qwen3_5_vl", "qwen3_5_moe_text", "qwen3_5_moe_vl", "qwen3_next"]
DENSE = ["llama", "llama_tied_linear", "qwen2", "qwen3", "gemma3"]
MOE = ["qwen3_moe", "mixtral"]
# What Qwen3.5 / Qwen3-Next release checkpoints carry beyond transformers' tiny models: the MTP block.
MTP_NAMES = [
    "mtp.fc.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
    "mtp.norm.weight",
    "mtp.layers.0.input_layernorm.weight",
    "mtp.layers.0.self_attn.q_proj.weight",
    "mtp.layers.0.mlp.gate.weight",
    "mtp.layers.0.mlp.experts.0.gate_proj.weight",
    "mtp.layers.0.mlp.shared_expert.down_proj.weight",
    "mtp.layers.0.mlp.shared_expert_gate.weight",
]


@pytest.mark.parametrize("name", DENSE + MOE + HYBRIDS)
def test_every_hf_tensor_gets_a_role(name, tiny_dir):
    ckpt = open_checkpoint(str(tiny_dir(name)))
    arch = ckpt.config.get("model_type")
    missing = [n for n in ckpt.tensors if role_of(n, arch) is None]
    assert not missing, missing[:5]


def test_mtp_tensors_keep_their_function():
    roles = {n: role_of(n, "qwen3_5_moe") for n in MTP_NAMES}
    assert None not in roles.values()
    assert roles["mtp.layers.0.mlp.gate.weight"] == "router"
    assert roles["mtp.layers.0.mlp.shared_expert_gate.weight"] == "shared_expert_gate"
    assert roles["mtp.pre_fc_norm_embedding.weight"] == "norm"
    assert roles["mtp.fc.weight"] == "mtp"
    assert all(in_mtp(n) and layer_of(n) is None for n in MTP_NAMES)


GGUF_ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "qwen35", "qwen35moe", "qwen3next", "bitnet"]
# Ollama's own converter (convert_qwen35.go, convert_gemma3.go) writes some names llama.cpp does not.
OLLAMA_NAMES = {
    "blk.0.ssm_ba.weight": "deltanet_ba",
    "blk.0.ssm_a": "ssm_a",
    "blk.0.ssm_dt": "ssm_dt",
    "blk.0.ssm_dt.bias": "ssm_dt",
    "v.blk.0.attn_qkv.weight": "vision",
    "v.blk.0.attn_out.weight": "vision",
    "v.patch_embed.weight": "vision",
    "mm.input_projection.weight": "vision",
    "mm.mm_soft_emb_norm.weight": "norm",
    "blk.0.ffn_gate_inp_shexp.weight": "shared_expert_gate",
}


def gguf_names(arch: str) -> list[str]:
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    kind = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    return [TENSOR_NAMES[t].format(bid=3) + ".weight" for t in MODEL_TENSORS[kind]]


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_every_gguf_tensor_gets_a_role(arch):
    missing = [n for n in gguf_names(arch) if role_of(n, arch) is None]
    assert not missing, missing


@pytest.mark.parametrize(
    ("name", "arch", "role"),
    [
        ("blk.3.attn_v.weight", "llama", "attn_v"),
        ("blk.3.ffn_down.weight", "llama", "mlp_down"),
        ("token_embd.weight", "llama", "embedding"),
        ("output.weight", "llama", "lm_head"),
        ("blk.3.attn_qkv.weight", "qwen35", "deltanet_qkv"),
        ("blk.3.attn_gate.weight", "qwen35", "deltanet_z"),
        ("blk.3.ssm_alpha.weight", "qwen35", "deltanet_a"),
        ("blk.3.ssm_beta.weight", "qwen35", "deltanet_b"),
        ("blk.3.ssm_in.weight", "qwen3next", "deltanet_qkvz"),
        ("blk.3.ffn_gate_inp.weight", "qwen35moe", "router"),
        ("blk.3.ffn_down_exps.weight", "qwen35moe", "expert_down"),
        ("blk.3.ssm_conv1d.weight", "qwen35", "conv1d"),
        ("blk.3.ssm_norm.weight", "qwen35", "norm"),
        ("blk.3.post_ffw_norm.weight", "gemma3", "norm"),
        ("model.layers.3.linear_attn.in_proj_qkvz.weight", None, "deltanet_qkvz"),
        ("model.layers.3.linear_attn.A_log", None, "ssm_a"),
        ("model.layers.3.linear_attn.dt_bias", None, "ssm_dt"),
        ("model.layers.3.mlp.experts.gate_up_proj", None, "expert_gate"),
        ("model.layers.3.mlp.experts.down_proj", None, "expert_down"),
        ("language_model.model.layers.3.mlp.switch_mlp.up_proj.weight", None, "expert_up"),
        ("model.layers.3.mlp.shared_expert.up_proj.weight", None, "shared_up"),
    ],
)
def test_role_examples(name, arch, role):
    assert role_of(name, arch) == role


@pytest.mark.parametrize(("name", "role"), OLLAMA_NAMES.items())
def test_ollama_names(name, role):
    assert role_of(name, "qwen35moe") == role


ALL_RECIPES = [
    *RECIPES.values(),
    *(uniform(b) for b in BITS),
    # a user asking for everything at 2 bits, ternary, even the protected roles
    make_recipe(bits=2, overrides={r: 2 for r in ROLES}),
    make_recipe("ternary", overrides={"gates": "ternary", "ssm_state": 2, "norm": 2}),
]


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda r: f"{r.name}{'+set' if r.overrides else ''}")
def test_floors_hold_under_every_recipe(recipe):
    for role, floor in FLOORS.items():
        for where in (Where(0, 4), Where(3, 4, gqa=8), Where(None, 4, mtp=True)):
            spec = recipe.spec(role, where)
            if floor is None:
                assert not spec.quantized, (role, spec)
            else:
                assert not spec.quantized or (spec.precision != "ternary" and spec.bits >= floor), (role, spec)


@pytest.mark.parametrize(
    "recipe",
    [RECIPES["q2_k"], RECIPES["experts-2bit"], make_recipe(bits=2, overrides={r: 2 for r in ROLES})],
    ids=lambda r: r.name,
)
def test_plan_of_a_moe_hybrid_respects_floors(recipe, tiny_dir):
    ckpt = open_checkpoint(str(tiny_dir("qwen3_5_moe_text")))
    the_plan = pipeline.plan(ckpt, recipe)
    seen = set()
    for item in the_plan.items:
        seen.add(item.role)
        if item.role in ("norm", "ssm_a", "ssm_dt", "conv1d"):
            assert not item.spec.quantized, item.name
        if item.role in ("router", "shared_expert_gate", "deltanet_a", "deltanet_b"):
            assert not item.spec.quantized or item.spec.bits >= 8, item.name
    assert {"router", "shared_expert_gate", "deltanet_a", "ssm_a", "conv1d", "norm"} <= seen
    if recipe.name == "experts-2bit":
        experts = [it for it in the_plan.items if it.role and it.role.startswith("expert_")]
        assert experts and all(it.spec.bits == 2 for it in experts)


def test_overrides_are_checked():
    assert parse_overrides(["attn_v=6", "experts=2", "embedding=float"]) == {
        "attn_v": 6,
        "experts": 2,
        "embedding": "float",
    }
    assert expand("ffn_down") == ("mlp_down", "expert_down", "shared_down")
    for bad in (["attn_v"], ["attn_v=seven"]):
        with pytest.raises(InvalidRequest):
            parse_overrides(bad)
    with pytest.raises(InvalidRequest, match="nonsense"):
        make_recipe(bits=4, overrides={"nonsense": 4})
    with pytest.raises(InvalidRequest, match="--bits 7"):
        make_recipe(bits=7)
    recipe = make_recipe("q3_k_m", overrides={"attn_v": 8})
    assert recipe.spec("attn_v", Where(0, 30)).bits == 8
    # a tied embedding is the head: the head's rule applies, and so does the user's `embedding=` override
    assert recipe.spec("lm_head", Where(), alias="embedding").bits == 6
    assert make_recipe(bits=3, overrides={"embedding": 8}).spec("lm_head", Where(), alias="embedding").bits == 8


def test_q3_k_m_follows_llama_cpp():
    r = RECIPES["q3_k_m"]
    n = 32
    assert [r.spec("attn_v", Where(i, n)).bits for i in (0, 1, 2, 31)] == [5, 5, 4, 4]
    assert [r.spec("mlp_down", Where(i, n)).bits for i in (0, 1, 2, 31)] == [5, 5, 4, 4]
    assert r.spec("attn_q", Where(5, n)).bits == 3 and r.spec("attn_o", Where(5, n)).bits == 4
    q2 = RECIPES["q2_k"]
    assert q2.spec("attn_qkv", Where(5, n, gqa=4)).bits == 4 and q2.spec("attn_qkv", Where(5, n, gqa=2)).bits == 3
    assert q2.spec("attn_v", Where(5, n, gqa=2)).bits == 4 and q2.spec("expert_up", Where(5, n)).bits == 2


@pytest.mark.slow
def test_q2_k_spends_its_bits_where_smollm2_is_sensitive(smollm2_gguf, tmp_path):
    """mlxq's q2_k against llama.cpp's Q2_K placement it replaced (attn_k and ffn_up at 2, attn_output 3, the head 6),
    both rounded to nearest on real SmolLM2: fewer bits per weight and a lower KL to the float model (the pinned
    weights dequantized) on calibration text."""
    from mlxq.eval.metrics import load_for_eval, reference, score
    from mlxq.formats.texts import calibration_texts
    from mlxq.quant.calibrate import token_batches
    from mlxq.quant.recipes import Recipe

    llama_cpp_q2_k = Recipe("q2_k-llama.cpp", 2, (("attn_v_like", 3, "all"), ("attn_v_like", 4, "gqa>=4"),
                                                  ("attn_o", 3, "all"), ("ffn_down", 3, "all"), ("lm_head", 6, "all")))
    base = load_for_eval(str(smollm2_gguf))
    wins = token_batches(base.tokenizer, calibration_texts(), 512, 256)
    ref = reference(base.logits, wins)
    got = {}
    for recipe in (RECIPES["q2_k"], llama_cpp_q2_k):
        result = quantized(smollm2_gguf, tmp_path / recipe.name, recipe, method="rtn")
        got[recipe.name] = (result.bpw_quantized, score(load_for_eval(str(result.out)).logits, wins, ref).kl)
    (bpw, kl), (old_bpw, old_kl) = got["q2_k"], got["q2_k-llama.cpp"]
    assert bpw < old_bpw - 0.2 and kl < 0.8 * old_kl, got


# ---------------------------------------------------------------------------------------------- round trip
def quantized(src: Path, out: Path, recipe, **kw) -> pipeline.Result:
    return pipeline.quantize(str(src), out, recipe, progress=False, **kw)


@pytest.mark.parametrize(
    ("name", "recipe"),
    [
        ("llama", uniform(4, 32)),
        ("llama_tied_linear", RECIPES["q3_k_m"]),
        ("qwen3", make_recipe("q2_k", group_size=32)),
        ("mixtral", RECIPES["experts-2bit"]),
    ],
)
def test_round_trip_mlx_lm_and_mlxq_agree(name, recipe, tiny_dir, tmp_path):
    import mlx_lm

    import mlxq
    from mlxq.eval.metrics import load_for_eval

    src = tiny_dir(name)
    before = digest(src)
    out = tmp_path / "q"
    result = quantized(src, out, recipe)
    assert digest(src) == before  # the source is never touched
    assert result.quantized > 0 and not list(tmp_path.glob(".q.partial-*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["mode"] == "affine" and cfg["quantization_config"] == cfg["quantization"]
    if recipe.name != "4bit":  # mixed recipes write per-layer entries
        assert any(isinstance(v, dict) for v in cfg["quantization"].values())
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors.index.json").exists()

    theirs, tokenizer = mlx_lm.load(str(out))
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the file's float16; compare in float32
    ours = mlxq.load(str(out), dtype=mx.float32)
    tokens = mx.array([PROMPT])
    ref = theirs(tokens)[0]
    assert rel(ours.logits(PROMPT), ref) < 1e-4
    # evaluation's shortcut (dequantized float32 weights) gives the quantized model's logits
    assert rel(load_for_eval(str(out)).logits(PROMPT), ref) < 1e-4
    assert tokenizer.encode("fox") == ours.tokenizer.encode("fox")


@pytest.mark.parametrize("name", ["gemma3", "qwen3_5_vl", "qwen3_5_moe_text", "qwen3_next"])
def test_round_trip_against_transformers(name, tiny_dir, tmp_path):
    """Families mlx-lm 0.32 does not all load (the MoE hybrids): the reference is transformers running the output's
    own numbers. mlxq's quantized model and its evaluation model give those logits, and 8-bit stays close to the
    float model."""
    import mlxq
    from mlxq.eval.metrics import load_for_eval

    src = tiny_dir(name)
    out = tmp_path / "q8"
    quantized(src, out, uniform(8, 32))
    want = transformers_logits(dequantized_copy(out, tmp_path / "ref", src), [PROMPT])[0]
    assert rel(mlxq.load(str(out), dtype=mx.float32).logits(PROMPT), want) < 1e-5
    assert rel(load_for_eval(str(out)).logits(PROMPT), want) < 1e-5
    assert rel(want, transformers_logits(src, [PROMPT])[0]) < 5e-2


def test_requantizing_an_mlx_lm_directory(tiny_dir, tmp_path):
    import mlx_lm

    from mlxq.eval.metrics import load_for_eval

    src = tiny_dir("qwen3")
    quantized(src, tmp_path / "q8", uniform(8, 32))
    quantized(tmp_path / "q8", tmp_path / "q4", uniform(4, 32))
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    theirs, _ = mlx_lm.load(str(tmp_path / "q4"))
    theirs.set_dtype(mx.float32)
    want = theirs(mx.array([PROMPT]))[0]
    assert rel(load_for_eval(str(tmp_path / "q4")).logits(PROMPT), want) < 1e-4
    assert rel(want, transformers_logits(src, [PROMPT])[0]) < 0.3


def test_small_shards_and_index(tiny_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "sharded"
    quantized(tiny_dir("llama"), out, uniform(4, 32), shard_bytes=20_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:
        with safe_open(str(s), "np") as f:
            assert f.metadata() == {"format": "mlx"}
            assert all(index["weight_map"][k] == s.name for k in f.keys())  # noqa: SIM118


def test_ternary_warns_once(tiny_dir, tmp_path):
    from io import StringIO

    from rich.console import Console

    pipeline._ternary_warned = False
    buf = StringIO()
    console = Console(file=buf, width=200)
    for i in range(2):
        pipeline.quantize(
            str(tiny_dir("llama")), tmp_path / f"t{i}", RECIPES["ternary"], console=console, progress=False
        )
    assert buf.getvalue().count("TERNARY") == 1


# ---------------------------------------------------------------------------------------------- calibration
@pytest.fixture()
def text_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("name", ["llama_tied_linear", "qwen3_5_moe_text"])
def test_calibration_covers_every_quantized_tensor(name, tiny_dir, text_file):
    from mlxq.quant.calibrate import cache_path, calibration_stats
    from mlxq.quant.source import float_checkpoint

    src = str(tiny_dir(name))

    def opener():
        return float_checkpoint(open_checkpoint(src))

    stats = calibration_stats(opener, str(text_file), hessian=True, n_tokens=512, seq_len=64)
    assert stats.tokens == 512
    the_plan = pipeline.plan(opener(), uniform(4, 32))
    for item in the_plan.items:
        if item.spec.quantized and not (item.role == "embedding" and not the_plan.tied):  # a lookup, no input
            importance, hessian = stats.lookup(item.name, the_plan.tied)
            assert importance is not None, item.name
            assert importance.shape[-1] == ckpt_cols(opener(), item.name)
            if item.role.startswith("expert_"):  # routed experts: the importance matrix only
                assert hessian is None, item.name
            else:
                assert hessian is not None and hessian.shape == (importance.shape[-1],) * 2, item.name
    assert cache_path(opener(), "text-" + hashlib.sha256(TEXT.encode()).hexdigest()[:12], 512, 64, True).exists()
    if name.startswith("qwen3_5_moe"):  # experts: one row per expert, each from its routed tokens only
        site = next(k for k in stats.diag if k.endswith("mlp.experts.gate_proj"))
        assert stats.diag[site].shape[0] == 8 and float(stats.diag[site].min()) >= 0


@pytest.mark.parametrize("name", ["llama_tied_linear", "gemma3", "qwen3_5_moe_text", "qwen3_next"])
def test_layer_by_layer_calibration_matches_whole_model_forward(name, tiny_dir, tmp_path):
    """`collect` runs one layer at a time over every sequence; its statistics are those of recording the
    whole model's ordinary forward pass, sequence by sequence."""
    from mlxq.loading import load_model
    from mlxq.quant.calibrate import attach, collect
    from mlxq.quant.source import float_checkpoint

    src = str(tiny_dir(name))
    batches = [[(7 * i + 3 * j) % 90 + 3 for j in range(48)] for i in range(3)]
    stats = collect(float_checkpoint(open_checkpoint(src)), batches, hessian=True, out=tmp_path / "stats")

    model = load_model(float_checkpoint(open_checkpoint(src)), dtype=mx.float32, fuse=False)
    accs = attach(model, hessian=True)
    for seq in batches:
        model(mx.array(seq)[None], model.make_cache())
    assert set(stats.diag) == set(accs)
    for site, acc in accs.items():
        diag, outer = acc.result()
        assert rel(stats.diag[site], diag) < 1e-5, site
        if outer is not None:
            assert rel(stats.hessian(site), outer) < 1e-5, site
        else:
            assert stats.hessian(site) is None and diag.ndim == 2, site  # experts only


def ckpt_cols(ckpt, name: str) -> int:
    return ckpt.tensors.info(name).shape[-1]


def test_calibrated_gptq_lowers_kl(tiny_dir, text_file, tmp_path):
    from mlxq.eval.metrics import load_for_eval, reference, score, windows

    src = tiny_dir("llama")
    rtn, cal = tmp_path / "rtn", tmp_path / "cal"
    quantized(src, rtn, uniform(2, 32))
    result = quantized(src, cal, uniform(2, 32), calibrate=str(text_file), calib_tokens=1024)
    assert result.method == "gptq"
    ref_model = load_for_eval(str(src))
    wins = windows(ref_model.tokenizer.encode(TEXT, add_special_tokens=False), 128, 1024)
    ref = reference(ref_model.logits, wins)
    kl = {p.name: score(load_for_eval(str(p)).logits, wins, ref).kl for p in (rtn, cal)}
    assert kl["cal"] < kl["rtn"]
    assert json.loads((cal / "config.json").read_text())["mlxq_quantization"]["calibration"]["tokens"] == 1024


# ---------------------------------------------------------------------------------------------- eval
def test_eval_against_itself_is_zero_kl(tiny_dir):
    from mlxq.eval.metrics import load_for_eval, reference, score, windows

    m = load_for_eval(str(tiny_dir("qwen3")))
    wins = windows(m.tokenizer.encode(TEXT, add_special_tokens=False), 100, 400)
    s = score(m.logits, wins, reference(m.logits, wins))
    assert s.tokens == 396 and abs(s.kl) < 1e-5 and s.top1 == 1.0 and s.ppl == pytest.approx(s.ref_ppl)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def expected_scores(src: Path, out: Path, text: str, ctx: int) -> dict:
    """`mlxq eval kl out --ref src` computed without mlxq: transformers for the reference, mlx-lm for the quantized
    model, numpy for the scores (KL(ref || model) per predicted position, argmax agreement, perplexities)."""
    import mlx_lm
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(src)).encode(text, add_special_tokens=False)
    wins = [w for w in (ids[i : i + ctx] for i in range(0, len(ids), ctx)) if len(w) >= 2]
    model, _ = mlx_lm.load(str(out))
    model.set_dtype(mx.float32)
    kl, agree, nll, ref_nll, n = 0.0, 0, 0.0, 0.0, 0
    for batch in ([w for w in wins if len(w) == ctx], [w for w in wins if len(w) < ctx]):  # equal lengths
        if not batch:
            continue
        ref = log_softmax(transformers_logits(src, batch)[:, :-1])
        got = log_softmax(np.array(model(mx.array(batch))[:, :-1]).astype(np.float64))
        kl += float((np.exp(ref) * (ref - got)).sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        targets = np.array(batch)[:, 1:, None]
        nll -= float(np.take_along_axis(got, targets, -1).sum())
        ref_nll -= float(np.take_along_axis(ref, targets, -1).sum())
        n += targets.size
    return {"tokens": n, "kl": kl / n, "top1": agree / n, "ppl": np.exp(nll / n), "ref_ppl": np.exp(ref_nll / n)}


def mlxq_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxq.cli", *args], capture_output=True, text=True, timeout=300)


def peaked_copy(src: Path, dest: Path, scale: float = 30.0) -> Path:
    """`src` with its output head scaled: a random tiny model predicts nearly uniformly, and between nearly uniform
    distributions KL(p || q) and KL(q || p) agree to 0.05%; peaked ones tell the two directions apart."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(str(dest / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * scale
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_cli_quantize_report_and_eval(tiny_dir, tmp_path):
    src = peaked_copy(tiny_dir("qwen3"), tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "cli-q2"
    done = mlxq_cli(
        "quantize",
        str(src),
        "-o",
        str(out),
        "--bits",
        "2",
        "-g",
        "32",
        "--set",
        "attn_v=8",
        "--report",
        "--report-tokens",
        "256",
    )
    assert done.returncode == 0, done.stderr
    assert "tensors quantized" in done.stdout and "mean KL" in done.stdout and "top-1 agreement" in done.stdout
    assert json.loads((out / "config.json").read_text())["quantization"]["model.layers.0.self_attn.v_proj"]["bits"] == 8
    done = mlxq_cli("eval", "kl", str(out), "--ref", str(src), "--text", str(text), "--ctx", "64", "--json")
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    want = expected_scores(src, out, TEXT, ctx=64)
    assert scores["tokens"] == want["tokens"] and scores["kl"] == pytest.approx(want["kl"], rel=1e-5)
    assert scores["top1"] == pytest.approx(want["top1"], abs=2 / want["tokens"])
    assert scores["ppl"] == pytest.approx(want["ppl"], rel=1e-4)
    assert scores["ref_ppl"] == pytest.approx(want["ref_ppl"], rel=1e-4)
    done = mlxq_cli("eval", "ppl", str(out), "--text", str(text), "--ctx", "64")
    assert done.returncode == 0 and "perplexity" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "4", "-o", "{out_exists}"], "already exists"),
        (["--bits", "4", "-o", "{inside}"], "inside the source"),
        (["--bits", "4", "--set", "nonsense=4", "-o", "{new}"], "not a role or group"),
        (["--bits", "4", "--method", "gptq", "-o", "{new}"], "needs calibration text"),
        (["--bits", "4", "--calibrate", "{missing}", "-o", "{new}"], "no such text file"),
    ],
)
def test_cli_errors_are_one_line(args, message, tiny_dir, tmp_path):
    src = tiny_dir("llama")
    (tmp_path / "exists").mkdir()
    paths = {
        "out_exists": tmp_path / "exists",
        "inside": src / "sub",
        "new": tmp_path / "new",
        "missing": tmp_path / "missing.txt",
    }
    done = mlxq_cli("quantize", str(src), *[a.format(**paths) for a in args])
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("mlxq: error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "new").exists() and not (src / "sub").exists()
    assert not re.search(r"Traceback", done.stderr)
