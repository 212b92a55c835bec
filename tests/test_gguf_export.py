"""GGUF export against llama.cpp itself: every mix is byte for byte what llama.cpp's own quantizer makes of the
same weights (tensor names, types, fallbacks and blocks), exported files load in llama.cpp (in a child process)
and give mlxq's logits on the same dequantized weights, SmolLM2 exported as Q4_K_M generates llama.cpp's greedy
text, and bad input gets one-line errors.

Tolerances (max |logit difference| / max |logit|, measured on these tiny models): float32 <= 1e-4 (2e-7..8e-7
measured; llama.cpp's KV cache set to float32, its default float16 cache alone costs 1e-3). F16 1e-3 (4.8e-4) and
BF16 1e-2 (3.7e-3): llama.cpp rounds activations to the weight's float type before its dot products. Block types
5e-2 (1.3e-2..3.2e-2 over every type and mix): llama.cpp quantizes activations to 8 bits (Q8_0 / Q8_K) for its
quantized dot products, an error of the order of an 8-bit weight's. For the low-bit types that is far below the
quantization error itself (Q4_K_M 0.26, Q2_K 0.79 on tiny qwen3), so a wrong block would show. Gemma 3's GELU runs
through ggml's float16 lookup table in llama.cpp; mlxq's reference rounds the same way here (1e-3 without it).
"""

from __future__ import annotations

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from llama_cpp_run import llama_cpp_greedy, llama_cpp_logits, llama_cpp_quantize
from test_bitnet import make_bitnet
from test_hybrid import make_tiny as make_hybrid
from tiny import WIDE, make_tiny, save_tiny_tokenizer

from mlxq.errors import ConfigError, InvalidRequest, TokenizerError, UnsupportedModel
from mlxq.formats import open_checkpoint
from mlxq.formats.base import Checkpoint
from mlxq.formats.gguf.export import export
from mlxq.loading import load_model
from mlxq.quant.recipes import GGUF_RECIPES, gguf_recipe

PROMPT = [3, 17, 42, 99, 5, 120, 7, 64, 11, 150, 33, 8, 19, 140]
TOLERANCE = {"F32": 1e-4, "F16": 1e-3, "BF16": 1e-2}
QUANTIZED_TOLERANCE = 5e-2
WIDE_GEMMA = {**WIDE, "query_pre_attn_scalar": 64}
# llama.cpp sizes the DeltaNet's value heads from the key head dim; key heads (2) != value heads (4) stays
HYBRID = {"linear_value_head_dim": 16}
# llama.cpp's qwen3next: routed experts in every layer, top-k weights renormalised
HYBRID_FIXES = {"qwen3_next": {"mlp_only_layers": [], "norm_topk_prob": True}}
# The wide hybrids serve the block-type cases: every expert active there, since random tiny routers leave
# near-ties that llama.cpp's 8-bit activations tip to another expert now and then (a jump of ~0.1 from that token
# on, measured; with all 8 experts active the same files agree within 3e-2). Routing itself is checked exactly by
# the float32 cases on the narrow ones (top 3 of 8).
HYBRID_WIDE, MOE_WIDE = {"hidden_size": 256}, {"num_experts_per_tok": 8}


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """family, wide -> a tiny HF directory with a tokenizer (built once per module)."""
    made = {}

    def get(family: str, wide: bool = False):
        if (family, wide) not in made:
            path = tmp_path_factory.mktemp(f"{family}{'-wide' * wide}")
            if family.startswith("bitnet"):  # llama.cpp's bitnet: SiLU, tied output head
                make_bitnet(path, family == "bitnet_packed", hidden_act="silu", tie_word_embeddings=True,
                            **({"hidden_size": 256, "intermediate_size": 512} if wide else {}))
            elif family == "qwen3_moe_norm":
                make_tiny(family, path, **({**WIDE, **MOE_WIDE, "num_experts_per_tok": 6} if wide else {}))
            elif family.startswith("qwen3_5") or family == "qwen3_next":
                make_hybrid(family, path, **HYBRID, **HYBRID_FIXES.get(family, {}), **(HYBRID_WIDE if wide else {}),
                            **(MOE_WIDE if wide and family in ("qwen3_5_moe_text", "qwen3_next") else {}))
            else:
                make_tiny(family, path, **((WIDE_GEMMA if family.startswith("gemma") else WIDE) if wide else {}))
            save_tiny_tokenizer(path, 160)
            made[family, wide] = path
        return made[family, wide]

    return get


def exported(src, tmp_path, kind: str):
    out = tmp_path / f"{kind}.gguf"
    export(str(src), out, gguf_recipe(kind), progress=False)
    return out


def ggml_gelu(x: mx.array) -> mx.array:
    """ggml's CPU GELU: the tanh approximation looked up in a float16 table (input and output rounded to float16),
    identity above 10, zero below -10."""
    y = nn.gelu_approx(x.astype(mx.float16).astype(mx.float32)).astype(mx.float16).astype(mx.float32)
    return mx.where(x <= -10, 0.0, mx.where(x >= 10, x, y))


def mlxq_net(path, src):
    """mlxq's model with the weights the GGUF holds (read back and dequantized by mlxq's GGUF reader) in the
    source's own architecture."""
    config = {k: v for k, v in open_checkpoint(str(src)).config.items() if k != "quantization_config"}  # float
    return load_model(Checkpoint(path, "gguf", config, open_checkpoint(str(path)).tensors), dtype=mx.float32)


def mlxq_logits(path, src) -> np.ndarray:
    net = mlxq_net(path, src)
    if open_checkpoint(str(src)).config["model_type"].startswith("gemma3"):
        for layer in net.model.layers:  # this model's GELU only (patching nn.gelu_approx would stay in a compile cache)
            layer.mlp.act = ggml_gelu
    return np.array(net(mx.array([PROMPT]), net.make_cache())[0])


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


LOGIT_CASES = [
    ("llama", False, "F32"), ("llama", False, "F16"), ("llama", False, "Q8_0"), ("llama", False, "Q4_0"),
    ("llama_tied_linear", False, "F32"), ("llama_tied_linear", False, "Q5_1"),
    ("qwen2", False, "F32"), ("qwen2", False, "Q4_K_M"),
    ("qwen3", False, "F32"), ("qwen3", False, "BF16"), ("qwen3", False, "Q5_0"),
    ("gemma3", False, "F32"), ("gemma3", False, "Q4_1"),
    ("llama", True, "Q4_K_M"), ("llama", True, "Q6_K"), ("llama", True, "Q2_K"), ("llama", True, "TQ1_0"),
    ("qwen3", True, "Q3_K_M"), ("qwen3", True, "Q5_K_S"), ("qwen3", True, "TQ2_0"),
    ("gemma3", True, "Q4_K_S"),
    ("qwen3_5_text", False, "F32"), ("qwen3_5_text", False, "Q8_0"), ("qwen3_5_text", True, "Q4_K_M"),
    ("qwen3_5_text", True, "Q3_K_M"), ("qwen3_5_vl", False, "Q5_1"),
    ("qwen3_5_moe_text", False, "F32"), ("qwen3_5_moe_text", True, "Q4_K_M"),
    ("qwen3_next", False, "F32"), ("qwen3_next", True, "Q6_K"),
    ("qwen3_moe_norm", False, "F32"), ("qwen3_moe_norm", True, "Q4_K_M"),
    # (a packed tiny BitNet with random codes is chaotic: any 8-bit activation rounding grows 10x over 14 tokens, so
    # its block-type agreement is shown on the float one, its exact ternary storage below)
    ("bitnet_packed", False, "F32"), ("bitnet_float", True, "TQ2_0"), ("bitnet_float", True, "TQ1_0"),
]


@pytest.mark.parametrize(("family", "wide", "kind"), LOGIT_CASES,
                         ids=[f"{f}{'-wide' * w}-{k}" for f, w, k in LOGIT_CASES])
def test_llama_cpp_loads_it_and_agrees_with_mlxq(family, wide, kind, tiny_src, tmp_path):
    src = tiny_src(family, wide)
    out = exported(src, tmp_path, kind)
    got = llama_cpp_logits(out, PROMPT)
    want = mlxq_logits(out, src)
    assert got.shape == want.shape == (len(PROMPT), 160)
    assert rel(got, want) <= TOLERANCE.get(kind, QUANTIZED_TOLERANCE)


def test_mlx_lm_layout_hybrid_exports_the_same_file(tiny_src, tmp_path):
    """An mlx-lm directory of a hybrid Qwen (conv stored [channels, kernel, 1], zero-centred norms as 1 + w) gives
    the very tensors its HF original does: the exporter brings them back to HF's layout first."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from mlxq.formats.gguf import names

    src = tiny_src("qwen3_5_moe_text")
    mlx_dir = tmp_path / "mlx-lm"
    shutil.copytree(src, mlx_dir)
    changed = 0
    for f in mlx_dir.glob("*.safetensors"):
        weights = load_file(f)
        for name, w in weights.items():
            if name.endswith("linear_attn.conv1d.weight"):
                weights[name], changed = w.swapaxes(1, 2).copy(), changed + 1
            elif names.PLUS_ONE in names.transforms("qwen35moe", name):
                weights[name], changed = w + np.float32(1) if w.dtype == np.float32 else w + 1, changed + 1
        save_file(weights, f)
    assert changed > 4
    assert tensors(exported(mlx_dir, tmp_path / "a", "F32")) == tensors(exported(src, tmp_path / "b", "F32"))


MIXES = [k for k in GGUF_RECIPES if k != "F32"]


@pytest.mark.parametrize(("family", "wide"), [("llama", False), ("qwen3", True)])
def test_iq4_nl_tensors_load_in_llama_cpp_and_agree(family, wide, tiny_src, tmp_path):
    """IQ4_NL (allocate's 4.5-bit rung for rows that are not whole 256-blocks) set on the attention and MLP roles:
    llama.cpp runs the file and gives mlxq's logits on the same blocks."""
    src = tiny_src(family, wide)
    out = tmp_path / "iq4_nl.gguf"
    export(str(src), out, gguf_recipe("Q4_K_M", {"attention": "IQ4_NL", "mlp": "IQ4_NL"}), progress=False)
    kinds = [t.tensor_type.name for t in gguf.GGUFReader(out).tensors]
    assert kinds.count("IQ4_NL") == 7 * 3  # every linear of the 3 layers
    assert rel(llama_cpp_logits(out, PROMPT), mlxq_logits(out, src)) <= QUANTIZED_TOLERANCE


def tensors(path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


SWEEP = [pytest.param(f, w, marks=[] if (f, w) == ("llama", True) else [pytest.mark.slow])
         for f in ("llama", "qwen2", "gemma3") for w in (False, True)]


@pytest.mark.parametrize(("family", "wide"), SWEEP, ids=[f"{f}-{'wide' if w else 'narrow'}" for f in
                                                          ("llama", "qwen2", "gemma3") for w in (False, True)])
def test_every_mix_is_what_llama_cpp_quantizes(family, wide, tiny_src, tmp_path):
    """llama.cpp's quantizer run on our float32 export gives, for every mix, our file's tensors byte for byte:
    the same type per tensor (mix rules, fallbacks for rows that are not whole blocks) and the same blocks."""
    src = tiny_src(family, wide)
    f32 = exported(src, tmp_path, "F32")
    for mix in MIXES:
        ours = tensors(exported(src, tmp_path, mix))
        ref_path = tmp_path / f"{mix}.llama.gguf"
        pure = f"MOSTLY_{mix}" not in gguf.LlamaFileType.__members__  # Q3_K, Q4_K, Q5_K: --pure with a _M type
        llama_cpp_quantize(f32, ref_path, f"MOSTLY_{mix}_M" if pure else f"MOSTLY_{mix}", pure=pure)
        ref = tensors(ref_path)
        assert set(ours) == set(ref), mix
        types = {n: (ours[n][0], ref[n][0]) for n in ref if ours[n][0] != ref[n][0]}
        assert not types, (mix, types)
        assert [n for n in ref if ours[n][1] != ref[n][1]] == [], mix


@pytest.mark.slow
def test_smollm2_q4_k_m_generates_llama_cpp_greedy_text(smollm2_gguf, tmp_path):
    """Real weights: SmolLM2 exported as Q4_K_M; llama.cpp's greedy continuation of a chat prompt equals mlxq's on
    the same file (16 tokens), and llama.cpp's fallback leaves 16 of 272 tensors in Q4_K."""
    import mlxq

    out = tmp_path / "smollm2-q4_k_m.gguf"
    result = export(str(smollm2_gguf), out, gguf_recipe("Q4_K_M"), progress=False)
    assert result.tensors == 272 and result.types["Q4_K"] == 16
    m = mlxq.load(str(out))
    ids = m.encode_prompt([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    mine = m.generate(ids, max_tokens=16, temperature=0.0)
    assert len(mine.tokens) == 16
    theirs = llama_cpp_greedy(out, ids, 16)
    assert theirs == mine.tokens
    assert m.tokenizer.decode(theirs) == mine.text


TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs!\n") * 40


@pytest.mark.parametrize(("family", "kind"), [("llama", "Q3_K"), ("llama", "Q4_0"), ("qwen3_5_text", "Q4_0")])
def test_calibrated_export_lowers_kl(family, kind, tiny_src, tmp_path, monkeypatch):
    """--calibrate --method gptq (codes and block scales chosen against each layer's Hessian, same format) gives
    a lower KL to the float model than the plain export, on the calibration text; llama.cpp runs the result."""
    from transformers import AutoTokenizer

    from mlxq.eval.metrics import reference, score, windows

    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    src = tiny_src(family, True)  # (qwen3_5: the DeltaNet's out_proj columns move; the statistics move with them)
    plain = exported(src, tmp_path, kind)
    cal = tmp_path / f"{kind}-cal.gguf"
    export(str(src), cal, gguf_recipe(kind), calibrate=str(text), method="gptq", calib_tokens=1024, progress=False)
    assert tensors(cal).keys() == tensors(plain).keys()
    float_net = load_model(open_checkpoint(str(src)), dtype=mx.float32)
    wins = windows(AutoTokenizer.from_pretrained(src).encode(TEXT), 128, 1024)

    def logits(net):
        return lambda ids: net(mx.array([ids]), net.make_cache())[0]

    ref = reference(logits(float_net), wins)
    kl = {p.name: score(logits(mlxq_net(p, src)), wins, ref).kl for p in (plain, cal)}
    assert kl[cal.name] < 0.8 * kl[plain.name], kl
    assert rel(llama_cpp_logits(cal, PROMPT), mlxq_logits(cal, src)) <= QUANTIZED_TOLERANCE


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M", "Q2_K"])
def test_importance_weighted_export_is_llama_quantize_with_the_same_imatrix(mix, tiny_src, tmp_path, monkeypatch):
    """--calibrate --method imatrix: given mlxq's importance matrix, llama.cpp's quantizer writes the same bytes."""
    from mlxq.formats.gguf.export import calibration_for, plan
    from mlxq.quant.calibrate import calibration_stats
    from mlxq.quant.source import float_checkpoint

    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    src = tiny_src("llama", True)
    ours = tmp_path / f"{mix}-imatrix.gguf"
    export(str(src), ours, gguf_recipe(mix), calibrate=str(text), method="imatrix", calib_tokens=1024,
           progress=False)

    def opener():
        return float_checkpoint(open_checkpoint(str(src)))

    stats = calibration_stats(opener, str(text), hessian=False, n_tokens=1024)  # (cached by the export)
    the_plan = plan(opener(), gguf_recipe(mix))
    found = {it.out.name: calibration_for(the_plan, it, stats)[0] for it in the_plan.items}
    imatrix = {name: imp for name, imp in found.items() if imp is not None}
    assert len(imatrix) == 22  # 7 linears x 3 layers + the output head
    ref = tmp_path / f"{mix}-llama.gguf"
    llama_cpp_quantize(exported(src, tmp_path, "F32"), ref, f"MOSTLY_{mix}", imatrix=imatrix)
    got, want = tensors(ours), tensors(ref)
    assert {n: t for n, (t, _) in got.items()} == {n: t for n, (t, _) in want.items()}
    assert [n for n in want if got[n][1] != want[n][1]] == []
    assert got != tensors(exported(src, tmp_path, mix))  # the importance matrix did change the codes


def test_tied_embedding_has_no_output_tensor(tiny_src, tmp_path):
    names = tensors(exported(tiny_src("llama_tied_linear"), tmp_path, "Q8_0"))
    assert "token_embd.weight" in names and "output.weight" not in names


def test_errors_are_one_line(tiny_src, tmp_path):
    src = tiny_src("llama")
    out = exported(src, tmp_path, "Q8_0")
    with pytest.raises(InvalidRequest, match="already exists"):
        export(str(src), out, gguf_recipe("Q8_0"), progress=False)
    with pytest.raises(InvalidRequest, match="--type Q9_K: unknown"):
        gguf_recipe("Q9_K")
    with pytest.raises(InvalidRequest, match="attn_v=7"):
        gguf_recipe("Q4_K_M", {"attn_v": 7})
    bare = tmp_path / "bare"
    make_tiny("qwen2", bare)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        export(str(bare), tmp_path / "bare.gguf", gguf_recipe("Q8_0"), progress=False)
    assert not (tmp_path / "bare.gguf").exists() and not list(tmp_path.glob(".bare.gguf*"))


def test_configs_llama_cpp_would_run_differently_are_refused(tmp_path):
    src = tmp_path / "gemma"
    make_tiny("gemma3", src, query_pre_attn_scalar=24)
    save_tiny_tokenizer(src, 160)
    with pytest.raises(ConfigError, match="query_pre_attn_scalar 24"):
        export(str(src), tmp_path / "g.gguf", gguf_recipe("Q8_0"), progress=False)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"linear_value_head_dim": 8}, "linear_value_head_dim 8 differs from linear_key_head_dim 16"),
    ({**HYBRID, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25,
                                    "mrope_section": [11, 11, 10]}}, r"mrope_section \[11, 11, 10\] does not fit"),
])
def test_hybrid_configs_llama_cpp_cannot_run_are_refused(overrides, message, tmp_path):
    """Refused before a byte is written: llama.cpp would abort (rope sections wider than the rotary) or read the
    DeltaNet's value heads at the key head size."""
    src = tmp_path / "q"
    make_hybrid("qwen3_5_text", src, **overrides)
    save_tiny_tokenizer(src, 160)
    with pytest.raises(ConfigError, match=message):
        export(str(src), tmp_path / "q.gguf", gguf_recipe("Q8_0"), progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".q.gguf*"))


@pytest.mark.parametrize(("family", "overrides", "message"), [
    ("qwen3_moe", {}, "norm_topk_prob is false"),  # (its tiny config: unnormalised, a dense layer among experts)
    ("qwen3_moe", {"norm_topk_prob": True}, r"mlp_only_layers \[1\]"),
    ("bitnet", {}, "hidden_act 'relu2'"),  # microsoft/bitnet-b1.58-2B-4T's activation
    ("bitnet", {"hidden_act": "silu"}, "tie_word_embeddings is false"),
])
def test_configs_other_llama_cpp_graphs_would_run_differently_are_refused(family, overrides, message, tmp_path):
    src = tmp_path / family
    src.mkdir()
    if family == "bitnet":
        make_bitnet(src, True, **overrides)
    else:
        make_tiny(family, src, **overrides)
    save_tiny_tokenizer(src, 160)
    with pytest.raises(ConfigError, match=message):
        export(str(src), tmp_path / "x.gguf", gguf_recipe("TQ2_0" if family == "bitnet" else "Q8_0"),
               progress=False)


def test_ternary_source_to_ternary_types_is_not_called_lossy(tiny_src, tmp_path):
    import io

    from rich.console import Console

    for kind, lossy in [("TQ1_0", False), ("F16", False), ("Q4_0", True)]:
        buf = io.StringIO()
        export(str(tiny_src("bitnet_packed", True)), tmp_path / f"{kind}.gguf", gguf_recipe(kind), progress=False,
               console=Console(file=buf, width=200))
        assert ("lossy" in buf.getvalue()) == lossy, (kind, buf.getvalue())
        assert ("TQ1_0 has no Metal kernels" in buf.getvalue()) == (kind == "TQ1_0"), buf.getvalue()


@pytest.mark.parametrize("kind", ["TQ1_0", "TQ2_0"])
def test_ternary_weights_are_stored_exactly_in_ternary_types(kind, tiny_src, tmp_path):
    """A BitNet checkpoint's ternary weights (codes x one scale per tensor) come back from TQ1_0 / TQ2_0 as they
    were, up to the float16 rounding of the block scale."""
    from mlxq.quant.source import float_checkpoint

    src = tiny_src("bitnet_packed", True)
    back = open_checkpoint(str(exported(src, tmp_path, kind))).tensors
    orig = float_checkpoint(open_checkpoint(str(src))).tensors
    name = "model.layers.1.mlp.down_proj.weight"
    assert tensors(tmp_path / f"{kind}.gguf")["blk.1.ffn_down.weight"][0] == kind
    w, v = np.array(orig[name]), np.array(back[name])
    assert set(np.unique(np.round(w / np.abs(w).max()))) == {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(v, w, rtol=2**-11, atol=0)


def test_mrope_sections_cover_the_rotary_width(tiny_src, tmp_path):
    meta = gguf.GGUFReader(exported(tiny_src("qwen3_5_text"), tmp_path, "F32")).fields
    assert meta["qwen35.rope.dimension_count"].contents() == 4  # head_dim 16 x partial_rotary_factor 0.25
    assert meta["qwen35.rope.dimension_sections"].contents() == [1, 1, 0, 0]
    # Ollama's own keys: its engine reads llama.cpp's layout but defaults both to false
    assert meta["qwen35.ssm.v_head_reordered"].contents() is True
    assert meta["qwen35.rope.mrope_interleaved"].contents() is True
    from mlxq.formats.gguf.export import _rope_sections

    assert _rope_sections({}, 64, "x") == [11, 11, 10, 0]  # Qwen3.5's own: llama.cpp's converter's default


def test_unsupported_architecture_names_it(tmp_path):
    import json

    src = tmp_path / "mamba"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 1}))
    from safetensors.numpy import save_file

    save_file({"model.layers.0.mixer.weight": np.zeros((2, 2), np.float32)}, str(src / "model.safetensors"))
    with pytest.raises(UnsupportedModel, match="model_type 'mamba' cannot be exported"):
        export(str(src), tmp_path / "m.gguf", gguf_recipe("F16"), progress=False)


def test_cli_export_and_its_errors(tiny_src, tmp_path):
    import subprocess
    import sys

    def mlxq(*args):
        return subprocess.run([sys.executable, "-m", "mlxq.cli", *args], capture_output=True, text=True,
                              timeout=300)

    src = str(tiny_src("qwen2"))
    done = mlxq("export", src, "-o", str(tmp_path / "q.gguf"), "--type", "q8_0", "--set", "embedding=F16")
    assert done.returncode == 0, done.stderr
    assert "q.gguf: 39 tensors" in done.stdout and tensors(tmp_path / "q.gguf")["token_embd.weight"][0] == "F16"
    for args, message in [(("--type", "Q8_0"), "already exists"), (("--set", "attn_v=Q9"), "attn_v=Q9"),
                          (("--set", "nonsense=Q8_0"), "'nonsense' is not a role")]:
        done = mlxq("export", src, "-o", str(tmp_path / "q.gguf"), *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_convert_both_ways_warns_when_lossy_and_names_the_better_path(tiny_src, tmp_path):
    """mlx-lm 4-bit -> GGUF (Q4_K_M by default) and GGUF Q6_K -> mlx-lm (6-bit by default): both re-quantize, so
    both warn and name the command that quantizes the original once; a float source converts without a warning.
    The results load: llama.cpp runs the GGUF, mlxq the mlx-lm directory (its logits within 6-bit rounding of the
    GGUF's)."""
    import subprocess
    import sys

    from mlxq.quant import pipeline
    from mlxq.quant.recipes import uniform

    def mlxq(*args):
        done = subprocess.run([sys.executable, "-m", "mlxq.cli", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return " ".join(done.stderr.split())

    src = tiny_src("qwen3", True)
    mlx4 = tmp_path / "mlx4"
    pipeline.quantize(str(src), mlx4, uniform(4), progress=False)
    said = mlxq("convert", str(mlx4), "-o", str(tmp_path / "from-mlx.gguf"))
    assert "lossy" in said and "mlx-lm affine 4-bit" in said and "mlxq export ORIGINAL" in said and "Q4_K_M" in said
    assert {t for t, _ in tensors(tmp_path / "from-mlx.gguf").values()} >= {"Q4_K", "Q6_K"}
    assert llama_cpp_logits(tmp_path / "from-mlx.gguf", PROMPT).shape == (len(PROMPT), 160)

    q6 = exported(src, tmp_path, "Q6_K")
    said = mlxq("convert", str(q6), "-o", str(tmp_path / "mlx6"))
    assert "lossy" in said and "GGUF Q6_K" in said and "mlxq quantize ORIGINAL" in said
    import json

    assert json.loads((tmp_path / "mlx6" / "config.json").read_text())["quantization"]["bits"] == 6
    import mlxq as api

    got = np.array(api.load(str(tmp_path / "mlx6")).logits(PROMPT))
    assert rel(got, mlxq_logits(q6, src)) < 0.1

    assert "lossy" not in mlxq("convert", str(src), "-o", str(tmp_path / "float.gguf"), "--type", "Q8_0")


def test_gguf_source_hands_its_vocabulary_over_byte_for_byte(tiny_src, tmp_path):
    """A GGUF source's tokenizer arrays (tokens, merges, types) are copied as the file encodes them, not decoded and
    re-encoded: every tokenizer.* field of the export reads back as the source's, and the strings are the same bytes."""
    first = exported(tiny_src("qwen3"), tmp_path / "a", "F32")
    second = exported(first, tmp_path / "b", "Q8_0")

    def fields(path):
        out = {}
        for name, f in gguf.GGUFReader(path).fields.items():
            if name.startswith("tokenizer."):
                out[name] = (f.types, [bytes(f.parts[i]) for i in f.data])
        return out

    want = fields(first)
    assert len(want["tokenizer.ggml.tokens"][1]) > 100 and len(want["tokenizer.ggml.merges"][1]) >= 10
    assert fields(second) == want


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_float_tensors_read_from_the_file_are_the_loaders(kind, tiny_src, tmp_path):
    """The export's own read of a float tensor (mapped from the file, converted in numpy) gives what the MLX loader
    gives, bit for bit: a GGUF source with llama's permuted q/k rows in each float type, and safetensors files in
    the same type."""
    src = tiny_src("llama")
    gguf_file = exported(src, tmp_path, kind)
    st_dir = tmp_path / "st"
    st_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            (st_dir / f).write_bytes((src / f).read_bytes())
    dtype = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}[kind]
    mx.save_safetensors(str(st_dir / "model.safetensors"),
                        {k: v.astype(dtype) for f in src.glob("*.safetensors") for k, v in mx.load(str(f)).items()})
    for path in (gguf_file, st_dir):
        ckpt = open_checkpoint(str(path))
        read = 0
        for name in ckpt.tensors:
            host = ckpt.tensors.host_float(name)
            want = np.asarray(ckpt.tensors[name].astype(mx.float32))
            assert host is not None and host.dtype == np.float32, name
            np.testing.assert_array_equal(host, want, err_msg=f"{path.name}: {name}")
            read += 1
        assert read > 10


@pytest.mark.parametrize("family", ["llama", "qwen3_5_text", "gemma3"])
def test_a_float_gguf_exported_again_keeps_its_tensors_bit_for_bit(family, tiny_src, tmp_path):
    """A float32 GGUF exported again as F32 holds the very same tensors: each is taken as the file stores it, not
    brought to HF's layout and back (which copied llama's permuted q/k twice, and rounded the hybrid's zero-centred
    norms, w - 1 + 1, and its decay rates, -exp(log(-A)))."""
    first = exported(tiny_src(family), tmp_path / "a", "F32")
    second = exported(first, tmp_path / "b", "F32")
    assert tensors(second) == tensors(first)
