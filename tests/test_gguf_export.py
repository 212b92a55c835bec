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


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """family, wide -> a tiny HF directory with a tokenizer (built once per module)."""
    made = {}

    def get(family: str, wide: bool = False):
        if (family, wide) not in made:
            path = tmp_path_factory.mktemp(f"{family}{'-wide' * wide}")
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
    config = open_checkpoint(str(src)).config
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


MIXES = [k for k in GGUF_RECIPES if k != "F32"]


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


@pytest.mark.parametrize("kind", ["Q3_K", "Q4_0"])
def test_calibrated_export_lowers_kl(kind, tiny_src, tmp_path, monkeypatch):
    """--calibrate (importance-weighted fits + GPTQ error feedback into the same block format) gives a lower KL
    to the float model than the plain export, on the calibration text; llama.cpp loads and runs the result."""
    from transformers import AutoTokenizer

    from mlxq.eval.metrics import reference, score, windows

    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    src = tiny_src("llama", True)
    plain = exported(src, tmp_path, kind)
    cal = tmp_path / f"{kind}-cal.gguf"
    export(str(src), cal, gguf_recipe(kind), calibrate=str(text), calib_tokens=1024, progress=False)
    assert tensors(cal).keys() == tensors(plain).keys()
    float_net = load_model(open_checkpoint(str(src)), dtype=mx.float32)
    wins = windows(AutoTokenizer.from_pretrained(src).encode(TEXT), 128, 1024)

    def logits(net):
        return lambda ids: net(mx.array([ids]), net.make_cache())[0]

    ref = reference(logits(float_net), wins)
    kl = {p.name: score(logits(mlxq_net(p, src)), wins, ref).kl for p in (plain, cal)}
    assert kl[cal.name] < 0.8 * kl[plain.name], kl
    assert rel(llama_cpp_logits(cal, PROMPT), mlxq_logits(cal, src)) <= QUANTIZED_TOLERANCE


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
