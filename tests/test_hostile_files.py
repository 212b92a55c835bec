"""Damaged and hostile checkpoints give one-line MlxqErrors naming the file and the field or tensor: never a
traceback, an unbounded allocation, or weights read from the wrong bytes (issue 10, defects 5-7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from gguf.constants import GGMLQuantizationType, GGUFValueType
from hostile import (
    ARCH,
    BoundedLoader,
    gguf_layout,
    patch,
    rewrite_safetensors_header,
    safetensors_header,
    write_gguf,
    write_safetensors_dir,
)

from mlxq.errors import ConfigError, FormatError, MlxqError
from mlxq.formats import open_checkpoint
from mlxq.loading import load_model

U32 = GGUFValueType.UINT32


def load(path, keep_quantized: bool = False):
    return load_model(open_checkpoint(str(path), keep_quantized=keep_quantized))


def refused(path, kind=MlxqError, match: str | None = None, keep_quantized: bool = False) -> str:
    with pytest.raises(kind, match=match) as info:
        load(path, keep_quantized)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.fixture
def st_dir(tmp_path):
    return write_safetensors_dir(tmp_path / "m")


@pytest.fixture
def gguf_file(tmp_path):
    return write_gguf(tmp_path / "m.gguf")


@pytest.fixture(scope="module")
def loader():
    bounded = BoundedLoader(memory_bytes=3 << 30, timeout_s=60)
    yield bounded
    bounded.close()


def test_pristine_fixtures_load_the_same_weights(tmp_path, loader):
    """The fixtures are sound (else every refusal below would prove nothing), and GGUF and safetensors give the
    same model: identical norms, F16/Q8_0/Q4_0 weights within their codecs' error."""
    import mlx.core as mx

    st = load(write_safetensors_dir(tmp_path / "st"))
    gg = load(write_gguf(tmp_path / "m.gguf"))
    tokens = mx.array([[1, 5, 9, 77, 150]])
    a, b = st(tokens, st.make_cache()), gg(tokens, gg.make_cache())
    assert float(mx.abs(a - b).max() / mx.abs(a).max()) < 0.1
    assert mx.array_equal(st.model.norm.weight, gg.model.norm.weight)
    assert loader.load(tmp_path / "m.gguf").outcome == "loaded"
    assert loader.load(tmp_path / "st").outcome == "loaded"


# ------------------------------------------------------------------------------------------------ safetensors
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("raw", [b"[]", b"1", b"null", DEEP,
                                 b'{"a": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}',
                                 b'{"a": {"dtype": "F32", "shape": ["2", "2"], "data_offsets": [0, 16]}}',
                                 b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}',
                                 b'{"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}', b"\xff\xfe"],
                         ids=["list", "int", "null", "deep", "dtype-int", "shape-strings", "offsets-reversed",
                              "dtype-unknown", "not-utf8"])
def test_safetensors_header_damage(st_dir, raw):
    rewrite_safetensors_header(st_dir / "model.safetensors", None, raw=raw)
    refused(st_dir, FormatError, "model.safetensors")


def test_safetensors_every_tensor_at_offset_zero(st_dir):
    f = st_dir / "model.safetensors"
    header = safetensors_header(f)
    for name, h in header.items():
        if name != "__metadata__":
            start, stop = h["data_offsets"]
            h["data_offsets"] = [0, stop - start]
    rewrite_safetensors_header(f, header)
    refused(st_dir, FormatError, "overlaps")


def test_safetensors_dtype_swapped_to_int(st_dir):
    """F32 -> I32 keeps every size right: only the weights' kind shows the damage."""
    f = st_dir / "model.safetensors"
    header = safetensors_header(f)
    header["model.layers.1.mlp.up_proj.weight"]["dtype"] = "I32"
    rewrite_safetensors_header(f, header)
    refused(st_dir, FormatError, r"model\.layers\.1\.mlp\.up_proj\.weight' is mlx.core.int32")


def test_cli_inspect_on_shape_strings_is_one_line(st_dir):
    f = st_dir / "model.safetensors"
    header = safetensors_header(f)
    header["model.norm.weight"]["shape"] = ["64"]
    rewrite_safetensors_header(f, header)
    done = subprocess.run([sys.executable, "-m", "mlxq.cli", "inspect", str(st_dir)], capture_output=True, text=True,
                          env={**os.environ, "MLXQ_NO_REEXEC": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "model.norm.weight" in done.stderr


@pytest.mark.parametrize("index", [[], {"weight_map": ["model.safetensors"]}, {"weight_map": {"a": "../../etc/passwd"}},
                                   {"weight_map": {"a": 5}}, {"nothing": 1}])
def test_bad_index(st_dir, index):
    (st_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(st_dir, FormatError, "model.safetensors.index.json")


# ------------------------------------------------------------------------------------------------ config.json
@pytest.mark.parametrize("config", ["[]", "null", "5", '"llama"'])
def test_config_not_an_object(st_dir, config):
    (st_dir / "config.json").write_text(config)
    refused(st_dir, ConfigError, "config.json")


@pytest.mark.parametrize(("field", "value", "why"), [
    ("num_attention_heads", 0, "integer >= 1"),
    ("num_attention_heads", 7, "must divide hidden_size"),
    ("num_key_value_heads", 3, "must divide num_attention_heads"),
    ("hidden_size", "64", "integer"),
    ("hidden_size", 2**40, "too large"),
    ("intermediate_size", 2**40, "too large"),
    ("vocab_size", 2**32 - 1, "too large"),
    ("vocab_size", 161, "embedding has 160 rows"),
    ("hidden_size", 32, "embedding has 64 columns"),
    ("num_hidden_layers", 10**9, r"layers 0\.\.2"),
    ("num_hidden_layers", True, "integer"),
    ("eos_token_id", "x", "token id"),
    ("eos_token_id", [2, -1], "token id"),
    ("rms_norm_eps", float("nan"), "number"),
    ("rope_theta", -1, "number > 0"),
    ("tie_word_embeddings", "false", "true or false"),
    ("rope_scaling", [1], "object"),
    ("max_position_embeddings", 2**40, "too large"),
])
def test_config_field(st_dir, field, value, why):
    config = json.loads((st_dir / "config.json").read_text())
    config[field] = value
    (st_dir / "config.json").write_text(json.dumps(config))
    message = refused(st_dir, ConfigError, why)
    assert f"'{field}'" in message


def test_config_type_the_family_reads_badly(st_dir):
    """What the shared checks do not foresee still fails as one ConfigError (the rope settings here)."""
    config = json.loads((st_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": "two"}
    (st_dir / "config.json").write_text(json.dumps(config))
    refused(st_dir, ConfigError, "config does not describe a model")


# ------------------------------------------------------------------------------------------------ GGUF metadata
@pytest.mark.parametrize(("key", "value", "why"), [
    ("attention.head_count", 0, "integer >= 1"),
    ("attention.head_count", 7, "must divide num_attention_heads"),
    ("attention.head_count_kv", 0, "integer >= 1"),
    ("embedding_length", 2**31, "too large"),
    ("vocab_size", 2**32 - 1, "too large"),
    ("block_count", 10**9, r"layers 0\.\.2"),
    ("block_count", 2, None),  # fewer layers than the file holds: an unexpected tensor
    ("attention.head_count", 128, "rows"),  # divides nothing wrong in the config, but not the q rows it un-permutes
])
def test_gguf_metadata_value(tmp_path, key, value, why):
    path = write_gguf(tmp_path / "m.gguf", {f"{ARCH}.{key}": (U32, value)})
    if why is None:
        refused(path, FormatError, r"unexpected tensor 'model\.layers\.2\.")
    elif why == "rows":
        refused(path, FormatError, r"tensor 'blk\.0\.attn_q\.weight' \(F16\) cannot be decoded")
    else:
        assert f"'{ARCH}.{key.removesuffix('_kv')}" in refused(path, ConfigError, why)


def test_gguf_metadata_of_the_wrong_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {f"{ARCH}.embedding_length": (GGUFValueType.STRING, "64")})
    refused(path, ConfigError, "embedding_length.*must be an integer")


@pytest.mark.parametrize(("meta", "why"), [
    ({f"{ARCH}.rope.scaling.type": (GGUFValueType.STRING, "linear")}, "'llama.rope.scaling.factor' is missing"),
    ({f"{ARCH}.rope.scaling.type": (GGUFValueType.STRING, "linear"),
      f"{ARCH}.rope.scaling.factor": (GGUFValueType.STRING, "x")}, "could not convert"),
])
def test_gguf_metadata_that_does_not_make_a_config(tmp_path, meta, why):
    refused(write_gguf(tmp_path / "m.gguf", meta), FormatError, why)


def test_gguf_token_id_outside_the_vocabulary(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"tokenizer.ggml.eos_token_id": (U32, 2**32 - 1)})
    refused(path, FormatError, "tokenizer.ggml.eos_token_id' is 4294967295")


def test_gguf_alignment_must_be_a_power_of_two(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"general.alignment": (U32, 48)})
    refused(path, FormatError, "general.alignment' is 48")


def test_gguf_other_alignment_loads(tmp_path):
    """A legal alignment other than the default moves every offset: the checks follow it."""
    load(write_gguf(tmp_path / "m.gguf", alignment=64))


def test_gguf_huge_array_is_refused_before_gguf_py_walks_it(tmp_path):
    """gguf-py would loop over 10^12 array items; the header walk bounds the count by the bytes left."""
    path = write_gguf(tmp_path / "m.gguf")
    kv_end, _, _ = gguf_layout(path)
    data = path.read_bytes()
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4  # value type, item type
    patch(path, at, "<Q", 10**12)
    refused(path, FormatError, "array of 1000000000000 strings")


# ------------------------------------------------------------------------------------------------ GGUF structure
@pytest.mark.parametrize("damage", ["shift+1", "zero", "max", "swap"])
def test_gguf_tensor_offsets(gguf_file, damage):
    _, _, records = gguf_layout(gguf_file)
    import gguf

    offsets = [int(t.data_offset) for t in gguf.GGUFReader(gguf_file).tensors]
    base = offsets[0]
    rel = [o - base for o in offsets]
    if damage == "shift+1":
        patch(gguf_file, records[3].offset_at, "<Q", rel[3] + 1)
    elif damage == "zero":
        for r in records:
            patch(gguf_file, r.offset_at, "<Q", 0)
    elif damage == "max":
        patch(gguf_file, records[5].offset_at, "<Q", 2**64 - 1)
    else:
        patch(gguf_file, records[1].offset_at, "<Q", rel[2])
        patch(gguf_file, records[2].offset_at, "<Q", rel[1])
    refused(gguf_file, FormatError, "data offset")


@pytest.mark.parametrize("kind", ["F32", "IQ2_XXS", "Q4_0", "Q8_0"])
def test_gguf_tensor_type_changed(gguf_file, kind):
    """(F16 -> BF16 keeps every size, and no loader can tell: both are 16-bit floats. The fuzzer leaves it out.)"""
    _, _, records = gguf_layout(gguf_file)
    middle = next(r for r in records if r.name.endswith("attn_q.weight"))  # F16 in the fixture
    patch(gguf_file, middle.type_at, "<I", GGMLQuantizationType[kind].value)
    refused(gguf_file, FormatError)


def test_gguf_last_tensor_type_changed_to_a_smaller_one(gguf_file):
    """No later offset shows it: the bytes left over after the last tensor do."""
    _, _, records = gguf_layout(gguf_file)
    patch(gguf_file, records[-1].type_at, "<I", GGMLQuantizationType.Q4_0.value)  # was Q8_0
    refused(gguf_file, FormatError, "after the last tensor")


def test_gguf_unknown_type_and_too_many_dims(gguf_file):
    _, _, records = gguf_layout(gguf_file)
    patch(gguf_file, records[0].type_at, "<I", 4)  # Q4_2: removed from ggml long ago
    refused(gguf_file, FormatError, "unknown type 4")


def test_gguf_integer_type_of_the_same_width(gguf_file):
    """F32 -> I32 keeps every offset right; integer tensors are never weights."""
    _, _, records = gguf_layout(gguf_file)
    norm = next(r for r in records if r.name.endswith("attn_norm.weight"))
    patch(gguf_file, norm.type_at, "<I", GGMLQuantizationType.I32.value)
    refused(gguf_file, FormatError, "cannot be decoded")


# ------------------------------------------------------------------------------------------------ bounded
def test_huge_sizes_are_refused_within_bounds(tmp_path, loader):
    """10^9 layers once meant 41 s and SIGABRT: now a refusal, in a process limited to 3 GiB."""
    gg = write_gguf(tmp_path / "m.gguf", {f"{ARCH}.block_count": (U32, 10**9)})
    st = write_safetensors_dir(tmp_path / "st")
    config = json.loads((st / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (st / "config.json").write_text(json.dumps(config))
    for path in (gg, st):
        outcome = loader.load(path)
        assert (outcome.outcome, outcome.error) == ("refused", "ConfigError"), outcome
