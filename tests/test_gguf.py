"""GGUF reading: block codecs bit-exact against gguf-py, tiny models written the way llama.cpp's converter
writes them (permuted llama q/k, Gemma's +1 norms, Llama 3 rope factors as a tensor) give transformers'
logits, and damaged files give one-line errors."""

from __future__ import annotations

import os

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from tiny import WIDE, make_tiny

from mlxq.errors import FormatError, UnsupportedModel
from mlxq.formats import open_checkpoint
from mlxq.formats.gguf import AFFINE_TYPES
from mlxq.formats.gguf.checks import skip_strings
from mlxq.formats.gguf.names import ARCHITECTURES, gguf_name
from mlxq.loading import load_model
from mlxq.models.layers import RoPE, rope_settings

PROMPT = [3, 17, 42, 99, 5, 120, 7, 64, 11, 150, 33, 8, 19, 140]
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_p6": "gemma3"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows (its fact, restated to write test files)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(ref, arch: str, path, quantize: str | None = None, v_type: str | None = None) -> None:
    """A GGUF of a transformers model, converted as llama.cpp does; `quantize` stores 2D weights in that
    block type (`v_type`: v_proj's in that one, as llama.cpp's mixes do)."""
    cfg = ref.config
    rope = rope_settings(cfg.to_dict(), "full_attention")
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for key, value in {"block_count": cfg.num_hidden_layers, "embedding_length": cfg.hidden_size,
                       "feed_forward_length": cfg.intermediate_size, "context_length": 512,
                       "attention.head_count": cfg.num_attention_heads,
                       "attention.head_count_kv": cfg.num_key_value_heads, "attention.key_length": head_dim,
                       "attention.value_length": head_dim}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    if rope["rope_type"] == "llama3":  # stored as per-frequency factors, as the converter does
        default = RoPE(head_dim, {**rope, "rope_type": "default"})._periods
        w.add_tensor("rope_freqs.weight", np.array(RoPE(head_dim, rope)._periods / default, dtype=np.float32))
    for name, p in ref.state_dict().items():
        t = p.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            t = _permute(t, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            t = _permute(t, cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1.0
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        target = gguf_name(arch, name)
        assert target, name
        if quantize and t.ndim == 2:
            qtype = gguf.GGMLQuantizationType[v_type if v_type and ".v_proj." in name else quantize]
            w.add_tensor(target, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(target, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("family", sorted(GGUF_ARCH))
def test_converted_tiny_model_gives_transformers_logits(family, tmp_path):
    ref = make_tiny(family, tmp_path / "hf")
    write_gguf(ref, GGUF_ARCH[family], tmp_path / "m.gguf")
    net = load_model(open_checkpoint(str(tmp_path / "m.gguf")))
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0].numpy()
    assert rel(net(mx.array([PROMPT]), net.make_cache())[0], want) < 1e-4


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_keep_quantized_equals_dequantized(kind, tmp_path):
    """Packed blocks loaded as MLX quantized layers (q/k permutation applied to packed rows) compute what
    transformers computes with gguf-py's dequantization of the same blocks, and what mlxq's float path computes."""
    ref = make_tiny("llama", tmp_path / "hf")
    write_gguf(ref, "llama", tmp_path / "q.gguf", quantize=kind)
    ckpt = open_checkpoint(str(tmp_path / "q.gguf"), keep_quantized=True)
    assert ckpt.quantization["model.layers.0.self_attn.q_proj"]["bits"] == AFFINE_TYPES[kind]
    packed = load_model(ckpt)
    plain = load_model(open_checkpoint(str(tmp_path / "q.gguf")))
    down = packed.model.layers[0].mlp.down_proj
    assert isinstance(down, nn.QuantizedLinear)
    # float16 scales and biases are kept as the file's (exact; the matmul promotes them), except an embedding's,
    # whose lookup dequantizes in its scales' dtype; off Metal, biases that are -2^(bits-1) times the scales (the
    # zero-point types) are not held but made per product
    assert down.scales.dtype == mx.float16
    if kind in ("Q4_0", "Q5_0", "Q8_0") and not mx.metal.is_available():
        assert "biases" not in down and down.bias_per_scale == -(1 << (down.bits - 1))
    else:
        assert down.biases.dtype == mx.float16
    embed = packed.model.embed_tokens
    assert not isinstance(embed, nn.QuantizedEmbedding) or embed.scales.dtype == mx.float32
    # The reference: every matrix through gguf-py's own block round trip. Blocks run along rows, so quantizing
    # the permuted q/k rows (as the file holds them) and quantizing the HF rows give the same numbers.
    qtype = gguf.GGMLQuantizationType[kind]
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
        want = ref(torch.tensor([PROMPT])).logits[0].numpy()
    tokens = mx.array([PROMPT])
    assert rel(packed(tokens, packed.make_cache())[0], want) < 1e-4
    assert rel(plain(tokens, plain.make_cache())[0], want) < 1e-4


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_biases_made_from_the_scales_are_never_held_while_loading(kind, tmp_path, monkeypatch):
    """Off Metal, a zero-point type's biases (-2^(bits-1) times its scales) leave as each layer is read: none reaches
    the model's sanitize (where every tensor read is held at once), the layers make them from their scales, and the
    logits are bit for bit those of a load that held them and dropped them after."""
    from mlxq import loading
    from mlxq.models import llama
    from mlxq.models.layers import QuantizedEmbedding, QuantizedLinear

    ref = make_tiny("llama", tmp_path / "hf")
    write_gguf(ref, "llama", tmp_path / "q.gguf", quantize=kind)
    read: list[set[str]] = []
    sanitize = llama.Model.sanitize
    monkeypatch.setattr(llama.Model, "sanitize", lambda self, w: read.append(set(w)) or sanitize(self, w))
    net = load_model(open_checkpoint(str(tmp_path / "q.gguf"), keep_quantized=True))
    monkeypatch.setattr(loading, "take_derived_biases", lambda *args: None)  # held while loading, dropped after
    held = load_model(open_checkpoint(str(tmp_path / "q.gguf"), keep_quantized=True))
    on_metal = mx.metal.is_available()
    biases = [{name for name in names if name.endswith(".biases")} for names in read]
    assert len(biases[1]) > 10  # what the load held before
    # the untied head is MLX's own nn.Linear, whose biases mlxq keeps
    assert biases[0] == (biases[1] if on_metal else {"lm_head.biases"})
    layers = [m for _, m in net.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    assert len(layers) > 10 and all(("biases" in m) == on_metal for m in layers)
    tokens = mx.array([PROMPT])
    assert mx.array_equal(net(tokens, net.make_cache()), held(tokens, held.make_cache()))
    # the rows of a lookup too (a tied embedding makes its biases in its scales' dtype)
    assert mx.array_equal(net.model.embed_tokens(tokens), held.model.embed_tokens(tokens))


# A load of `sys.argv[1]` with every biases graph of a zero-point type carrying a 64 MB computation (values unchanged):
# MLX's peak memory shows it if anything evaluates one. In a process of its own: the peak is the whole process's, and
# in a test session other tests' threads may still be computing.
_TRAPPED_LOAD = """
import sys
import mlx.core as mx
from mlxq.formats import open_checkpoint
from mlxq.kernels import kquants
from mlxq.loading import load_model

affine_blocks = kquants._affine_blocks
def with_a_trap(b, k):
    packed, scales, biases = affine_blocks(b, k)
    return packed, scales, biases + 0 * mx.arange(1 << 24, dtype=mx.float32).sum()
kquants._affine_blocks = with_a_trap
mx.reset_peak_memory()
net = load_model(open_checkpoint(sys.argv[1], keep_quantized=True))
down = net.model.layers[0].mlp.down_proj
print(mx.get_peak_memory(), "biases" in down, getattr(down, "bias_per_scale", None), down.bits)
"""


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_biases_made_from_the_scales_by_construction_are_never_evaluated(kind, tmp_path):
    """Off Metal, a load decides that a zero-point type's biases are derived from its scales alone: the biases'
    graph (float32 product, float16 round trip, comparison with the scales) is never evaluated."""
    import subprocess
    import sys

    if mx.metal.is_available():
        pytest.skip("biases are held on Metal")
    ref = make_tiny("llama", tmp_path / "hf", tie_word_embeddings=True)  # no head: MLX's nn.Linear keeps biases
    write_gguf(ref, "llama", tmp_path / "q.gguf", quantize=kind)
    run = subprocess.run([sys.executable, "-c", _TRAPPED_LOAD, str(tmp_path / "q.gguf")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak, has_biases, factor, bits = run.stdout.split()
    assert int(peak) < 16 << 20
    assert has_biases == "False" and int(factor) == -(1 << (int(bits) - 1))


def test_a_scale_too_large_for_float16_biases_keeps_them(tmp_path):
    """A Q8_0 layer whose scale times -128 overflows float16 keeps its biases, float32 and exact, as a load that
    checks the biases themselves does; the other layers' biases are made from their scales."""
    if mx.metal.is_available():
        pytest.skip("biases are held on Metal")
    ref = make_tiny("llama", tmp_path / "hf")
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight[0, 0] = 600.0 * 127  # its block's scale 600: biases -76800
    write_gguf(ref, "llama", tmp_path / "q.gguf", quantize="Q8_0")
    net = load_model(open_checkpoint(str(tmp_path / "q.gguf"), keep_quantized=True))
    big, other = net.model.layers[0].mlp.down_proj, net.model.layers[1].mlp.down_proj
    assert big.biases.dtype == mx.float32 and getattr(big, "bias_per_scale", None) is None
    assert mx.array_equal(big.biases, -128 * big.scales.astype(mx.float32)).item()
    assert big.biases.min().item() == -76800
    assert "biases" not in other and other.bias_per_scale == -128


def test_outsized_tensors_are_those_twice_every_later_one():
    """MLX's cache is handed back after reading a tensor more than twice the size of every tensor read after it (a
    small model's embedding among its layers: what converting it leaves in the cache fits no later tensor)."""
    from mlxq.formats.base import TensorInfo, TensorSource
    from mlxq.loading import _outsized

    sizes = {"norm": 8, "embed.weight": 900, "embed.scales": 0, "l0.weight": 100, "l0.scales": 0, "l1.weight": 400,
             "l2.weight": 100, "l3.weight": 60, "last.weight": 10}
    infos = {name: TensorInfo(name, (n,), "F32", n) for name, n in sizes.items()}
    ckpt = type("Ckpt", (), {"tensors": TensorSource(infos, lambda name: mx.zeros(1))})()
    assert _outsized(ckpt) == {"embed.weight", "l1.weight", "l3.weight"}


def test_smollm2_metadata_becomes_hf_config(smollm2_gguf):
    ckpt = open_checkpoint(str(smollm2_gguf))
    c = ckpt.config
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"]) == ("llama", 30, 576)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]) == (9, 3, 1536)
    assert c["tie_word_embeddings"] and c["rope_theta"] == 100000.0 and c["vocab_size"] == 49152
    assert "lm_head.weight" not in ckpt.tensors and ckpt.chat_template.startswith("{% for message")
    assert ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)


def test_truncated_gguf_is_a_one_line_error(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = smollm2_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="cut.gguf: .*truncated"):
        open_checkpoint(str(cut))
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:1000])  # ends inside the metadata
    with pytest.raises(FormatError, match="head.gguf"):
        open_checkpoint(str(head))


def test_skip_strings_finds_the_end_or_says_it_runs_past():
    texts = [b"", b"a", b"\xc4\xa0the", b"x" * 300]
    data = b"".join(len(t).to_bytes(8, "little") + t for t in texts)
    assert skip_strings(data, 0, 4) == len(data)
    assert skip_strings(data + b"tail", 0, 3) == len(data) - 308
    assert skip_strings(data[:-1], 0, 4) > len(data) - 1  # the last string runs past the end
    assert skip_strings(data[:13], 0, 3) == 14  # the second string's length is cut: one past the end
    assert skip_strings(data, 0, 5) == len(data) + 1  # one string more than there are
    huge = (1 << 64) - 1  # a damaged length: the next offset is past what an index can hold
    assert skip_strings(huge.to_bytes(8, "little") + data, 0, 2) == len(data) + 9


def test_unknown_architecture_names_it(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba9")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="'mamba9' is not supported"):
        open_checkpoint(str(tmp_path / "x.gguf"))
    assert "llama" in ARCHITECTURES


@pytest.mark.parametrize("arch", [[0], 7, None])
def test_architecture_that_is_not_a_string_is_one_format_error(tmp_path, arch):
    """Found by the long GGUF fuzz run: an array there raised TypeError (unhashable) instead of a one-line error."""
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    w.kv_data[0].pop("general.architecture")
    if arch is not None:
        w.add_key_value("general.architecture", arch,
                        gguf.GGUFValueType.ARRAY if isinstance(arch, list) else gguf.GGUFValueType.UINT32,
                        sub_type=gguf.GGUFValueType.UINT32 if isinstance(arch, list) else None)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="x.gguf: metadata 'general.architecture' is (missing|a )"):
        open_checkpoint(str(tmp_path / "x.gguf"))


def test_gguf_tokenizer_cache_holds_its_added_tokens(smollm2_gguf, tmp_path, monkeypatch):
    """The tokenizer built from GGUF vocab is cached with its added tokens in tokenizer_config.json, so transformers
    need not parse tokenizer.json in Python; an entry cached without them (as before) is upgraded on its next load,
    and tokenizes, marks special tokens and decodes as transformers' own reading of the old entry does."""
    import json
    import shutil

    from transformers import PreTrainedTokenizerFast

    from mlxq.engine.tokenizer import Tokenizer, gguf_tokenizer_cache, load_tokenizer

    load_tokenizer(None, smollm2_gguf, None)  # the shared cache entry, built if missing
    entry = gguf_tokenizer_cache(smollm2_gguf)
    old = tmp_path / "tokenizers" / entry.name
    shutil.copytree(entry, old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    reference = Tokenizer(PreTrainedTokenizerFast.from_pretrained(str(old)))  # reads tokenizer.json's added tokens

    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path))
    ours = load_tokenizer(None, smollm2_gguf, None)
    added = json.loads((old / "tokenizer.json").read_text())["added_tokens"]
    written = json.loads((old / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {int(i): t for i, t in written.items()} == {t.pop("id"): t for t in added}
    text = "<|im_start|>user\nHello wörld, 12345 tokens!<|im_end|>\n<|endoftext|> <jupyter_code>"
    ids = reference.encode(text)
    assert ours.encode(text) == ids and ours.eos_token_ids == reference.eos_token_ids
    assert ours.hf.all_special_ids == reference.hf.all_special_ids
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)



def test_gguf_tokenizer_cache_holds_merges_as_strings(smollm2_gguf, tmp_path, monkeypatch):
    """The cached tokenizer.json holds its BPE merges as "a b" strings (faster to parse than pairs); an entry cached
    with pairs (as transformers saves them) is rewritten on its next load and tokenizes and decodes as transformers'
    own reading of the pairs does. A merge whose token holds a space keeps the pair form."""
    import json
    import shutil

    from transformers import PreTrainedTokenizerFast

    from mlxq.engine.tokenizer import (
        _STRING_MERGES,
        Tokenizer,
        _merges_as_strings,
        gguf_tokenizer_cache,
        load_tokenizer,
    )

    load_tokenizer(None, smollm2_gguf, None)  # the shared cache entry, built if missing
    entry = gguf_tokenizer_cache(smollm2_gguf)
    assert all(isinstance(m, str) for m in json.loads((entry / "tokenizer.json").read_text())["model"]["merges"])
    old = tmp_path / "tokenizers" / entry.name
    shutil.copytree(entry, old)
    spec = json.loads((old / "tokenizer.json").read_text())
    spec["model"]["merges"] = [m.split(" ") for m in spec["model"]["merges"]]
    (old / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (old / _STRING_MERGES).unlink()
    reference = Tokenizer(PreTrainedTokenizerFast.from_pretrained(str(old)))

    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path))
    ours = load_tokenizer(None, smollm2_gguf, None)
    merges = json.loads((old / "tokenizer.json").read_text())["model"]["merges"]
    assert merges == [" ".join(m) for m in spec["model"]["merges"]]
    text = ("<|im_start|>user\nHello wörld, 12345 tokens!  Ünïcödé — 日本語のテキスト 🙂\n\tdef f(x):\n    return x**2"
            "<|im_end|>\n<|endoftext|> <jupyter_code>")
    ids = reference.encode(text)
    assert ours.encode(text) == ids and len(ids) > 40
    assert ours.decode(ids) == reference.decode(ids)

    spaced = tmp_path / "spaced"
    spaced.mkdir()
    pairs = {"model": {"type": "BPE", "merges": [["a", "b"], ["a b", "c"]]}}
    (spaced / "tokenizer.json").write_text(json.dumps(pairs))
    _merges_as_strings(spaced)
    assert json.loads((spaced / "tokenizer.json").read_text()) == pairs


def test_end_of_turn_ids_looked_up_as_the_vocabulary_has_them(smollm2_gguf):
    """The end-of-turn tokens are looked up one by one (not through the 49k-entry `get_vocab` dict): the same ids as
    the dict gives, the unknown token itself found (SmolLM2's <|endoftext|> is its unk token, id 0), and a token the
    vocabulary lacks not mistaken for the unknown token it maps to."""
    from mlxq.engine.tokenizer import END_OF_TURN, load_tokenizer

    tokenizer = load_tokenizer(None, smollm2_gguf, None)
    hf = tokenizer.hf
    vocab = hf.get_vocab()
    assert hf.unk_token == "<|endoftext|>" and "<|eot_id|>" not in vocab  # what the cases below rely on
    assert {t: tokenizer.token_id(t) for t in END_OF_TURN} == {t: vocab.get(t) for t in END_OF_TURN}
    assert tokenizer.eos_token_ids == {vocab[t] for t in END_OF_TURN if t in vocab} | {hf.eos_token_id}


@pytest.mark.parametrize("kind, v_type", [("Q5_0", None), ("Q8_0", None), ("TQ2_0", None), ("Q5_0", "Q8_0")])
def test_modules_the_model_fuses_are_read_as_one_array(kind, v_type, tmp_path):
    """q/k/v and gate/up (packed alike) are read into one array and converted once, each module its block of rows
    (llama's q/k permutation undone as the rows are read; TQ2_0 kept as raw blocks; with v in another type, q, k and
    v each on its own): every part dequantizes exactly to gguf-py's dequantization of its own file tensor in HF row
    order, and the parts of one array join back into it without a copy."""
    from mlxq.formats.gguf import names
    from mlxq.formats.gguf.reader import read_bytes
    from mlxq.kernels import kquants
    from mlxq.kernels.rows import joined_rows

    ref = make_tiny("llama", tmp_path / "hf", **WIDE)  # rows of 256: whole K-quant blocks
    write_gguf(ref, "llama", tmp_path / "q.gguf", quantize=kind, v_type=v_type)
    ckpt = open_checkpoint(str(tmp_path / "q.gguf"), keep_quantized=True)
    header = ckpt.extra["gguf_header"]
    groups = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
    for layer in range(ckpt.config["num_hidden_layers"]):
        for block, modules in groups.items():
            parts = []
            for module in modules:
                hf = f"model.layers.{layer}.{block}.{module}"
                record = header.tensors[gguf_name("llama", f"{hf}.weight")]
                qtype = gguf.GGMLQuantizationType[record.kind]
                stored = gguf.quants.dequantize(read_bytes(ckpt.path, record).reshape(record.shape[0], -1), qtype)
                want = names.to_hf_all(names.transforms("llama", f"{hf}.weight"), stored, ckpt.config)
                weight = ckpt.tensors[f"{hf}.weight"]
                if record.kind in AFFINE_TYPES:
                    got = mx.dequantize(weight, ckpt.tensors[f"{hf}.scales"].astype(mx.float32),
                                        ckpt.tensors[f"{hf}.biases"].astype(mx.float32), group_size=32,
                                        bits=AFFINE_TYPES[record.kind])
                else:
                    assert weight.dtype == mx.uint8  # the file's blocks, kept
                    got = kquants.dequantize(weight, record.kind)
                np.testing.assert_array_equal(np.array(got), want)
                parts.append(weight)
            # the rows of one array: joined again it is that array (the same one each time), not a new copy
            if block == "mlp" or v_type is None:
                assert joined_rows(parts) is joined_rows(parts)


def test_a_read_that_stops_short_goes_on_from_there(tmp_path, monkeypatch):
    """preadv may read less than asked (a signal, some file systems): the rest is read from where it stopped, also
    for rows scattered by a permutation."""
    import os

    from mlxq.formats.gguf import reader

    data = np.random.default_rng(0).integers(0, 256, size=(37, 40), dtype=np.uint8)
    path = tmp_path / "rows.bin"
    path.write_bytes(b"x" * 13 + data.tobytes())
    record = reader.TensorRecord("t", (37, 40), "Q8_0", 13, data.nbytes)
    real = os.preadv

    def short(fd, buffers, offset):  # at most 55 bytes a call: stops inside a row
        out, left = [], 55
        for b in buffers:
            if left <= 0:
                break
            out.append(b[: min(len(b), left)])
            left -= len(out[-1])
        return real(fd, out, offset)

    monkeypatch.setattr(reader.os, "preadv", short)
    whole = np.zeros_like(data)
    reader._read_into(path, record, whole)
    np.testing.assert_array_equal(whole, data)
    order = np.random.default_rng(1).permutation(37)  # HF row j is the file's row order[j]
    scattered = np.zeros_like(data)
    reader._read_into(path, record, scattered, order)
    np.testing.assert_array_equal(scattered, data[order])


def test_a_load_queues_each_window_before_it_resolves_the_one_before(tmp_path, monkeypatch):
    """A load converts a window of tensors while it reads the next: each window's conversion is queued (one
    asynchronous evaluation) before the window before it is resolved (its float16 choices and derived-bias checks
    read), `beside` (the tokenizer's parse, in `mlxq.load`) starts once, before the first window is queued, and the
    model is bit for bit the model of a load in one window."""
    from mlx.utils import tree_flatten

    from mlxq import loading

    ref = make_tiny("llama", tmp_path / "hf")
    write_gguf(ref, "llama", tmp_path / "q.gguf", quantize="Q8_0")
    path = str(tmp_path / "q.gguf")
    whole = load_model(open_checkpoint(path, keep_quantized=True))  # the default first window holds it all
    events: list[tuple] = []
    async_eval, resolve = mx.async_eval, loading._resolve
    monkeypatch.setattr(loading.mx, "async_eval", lambda arrays: events.append(("queue",)) or async_eval(arrays))
    monkeypatch.setattr(loading, "_resolve", lambda values, *a: events.append(("resolve", *values)) or resolve(
        values, *a))
    monkeypatch.setattr(loading, "FIRST_WINDOW_BYTES", 1)  # a window per module
    ckpt = open_checkpoint(path, keep_quantized=True)
    windows = list(loading._windows(ckpt, list(ckpt.tensors)))
    assert len(windows) > 10
    net = load_model(ckpt, beside=lambda: events.append(("beside",)))
    expected = [("beside",), ("queue",)]
    for before in windows[:-1]:  # each next window queued, then the one before resolved
        expected += [("queue",), ("resolve", *before)]
    assert events == expected + [("resolve", *windows[-1])]
    got, want = dict(tree_flatten(net.parameters())), dict(tree_flatten(whole.parameters()))
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert got[name].dtype == w.dtype and mx.array_equal(got[name], w).item(), name


def test_windows_end_with_a_modules_last_tensor(monkeypatch):
    """The first window holds at least FIRST_WINDOW_BYTES of the file, every later one a module; none ends inside a
    module (its scales and biases are checked together)."""
    from mlxq import loading
    from mlxq.formats.base import TensorInfo, TensorSource

    sizes = {"norm.weight": 8, "embed.weight": 900, "embed.scales": 0, "embed.biases": 0, "l0.q.weight": 100,
             "l0.q.scales": 0, "l0.q.biases": 0, "l0.norm.weight": 4, "l1.q.weight": 400, "l1.q.scales": 0}
    infos = {name: TensorInfo(name, (n,), "F32", n) for name, n in sizes.items()}
    ckpt = type("Ckpt", (), {"tensors": TensorSource(infos, lambda name: mx.zeros(1))})()
    monkeypatch.setattr(loading, "FIRST_WINDOW_BYTES", 950)
    assert list(loading._windows(ckpt, list(sizes))) == [
        ["norm.weight", "embed.weight", "embed.scales", "embed.biases", "l0.q.weight", "l0.q.scales", "l0.q.biases"],
        ["l0.norm.weight"], ["l1.q.weight", "l1.q.scales"]]


def test_a_narrowing_is_float16_only_where_exact_and_its_parts_choose_as_it_does():
    """Scales and biases stay float32 where float16 would overflow or round one value, else become float16 (as
    stored when they are); the choice is made when resolved, once, and the rows a joint read cuts from it choose as
    the whole does and join back into the very array chosen."""
    from mlxq.kernels.kquants import Narrowing
    from mlxq.kernels.rows import cut_rows, joined_rows

    exact = mx.array([[0.5, -3.0], [1024.0, 2.0**-20]])
    for values, dtype in [(exact, mx.float16), (exact.at[0, 0].add(70000.0), mx.float32),
                          (exact.at[0, 0].add(2.0**-12), mx.float32), (exact.astype(mx.float16), mx.float16)]:
        n = Narrowing(values)
        mx.eval(n.arrays)
        chosen = n.resolve()
        assert chosen.dtype == dtype and n.resolve() is chosen
        assert mx.array_equal(chosen.astype(mx.float32), values.astype(mx.float32)).item()
        parts = n.split(lambda a: cut_rows(a, [1, 1]))
        assert [p.resolve().dtype for p in parts] == [dtype, dtype]
        assert joined_rows([p.resolve() for p in parts]) is chosen
        assert n.map(lambda a: a.T).resolve().dtype == dtype


def test_a_read_error_inside_a_window_is_one_format_error_naming_the_tensor(tmp_path, monkeypatch):
    """A read that fails (EIO) for a tensor in the middle of a window of the load is one FormatError naming the file
    and that tensor."""
    import errno

    from mlxq.formats.gguf import reader

    ref = make_tiny("llama", tmp_path / "hf")
    write_gguf(ref, "llama", tmp_path / "q.gguf", quantize="Q8_0")
    ckpt = open_checkpoint(str(tmp_path / "q.gguf"), keep_quantized=True)
    record = ckpt.extra["gguf_header"].tensors["blk.0.ffn_down.weight"]
    real = os.preadv

    def failing(fd, buffers, offset):
        if offset == record.offset:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader.os, "preadv", failing)
    with pytest.raises(FormatError, match=r"q\.gguf: cannot read tensor 'blk\.0\.ffn_down\.weight' \(Input/output"):
        load_model(ckpt)
