"""Property-based fuzzing of the loaders (issue 10): damaged GGUF and safetensors checkpoints, loaded in a worker
process limited to 3 GiB of address space with a deadline per load (`hostile.BoundedLoader`), end in exactly one
of two ways: a one-line MlxqError, or a correct load. Never another exception, a crash, a hang, or weights read
from the wrong bytes.

"Correct" is checked where it can be: damage to tensor records (offsets, types, shapes, names, the safetensors
header) must either be refused or leave every tensor bit-identical to the undamaged file's. Damage to metadata
(config values) may load as a different but consistent model. One kind of damage no loader can see is counted
apart and not failed: a swap that keeps every size and offset consistent: a GGUF tensor type swapped for another
with the same block geometry (F16 <-> BF16, Q4_0 <-> IQ4_NL), or two same-sized safetensors tensors trading byte
ranges. Only checksums could tell, and neither format has them (llama.cpp and safetensors load those too).

`make test` runs a small fixed-seed budget; the long run is `pytest -m slow tests/test_fuzz_files.py`
(MLXQ_FUZZ_EXAMPLES sets its size; its counts print as JSON, and go to MLXQ_FUZZ_REPORT when set).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hostile import (
    ARCH,
    GGUF_META,
    HF_CONFIG,
    RUNS,
    BoundedLoader,
    budget,
    gguf_layout,
    gguf_value_type,
    patch,
    reporting,
    rewrite_safetensors_header,
    safetensors_header,
    write_gguf,
    write_safetensors_dir,
)
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

FAST_EXAMPLES = 60  # per target, in `make test`

# ------------------------------------------------------------------------------------------------ values
INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65, 96, 128, 159, 160, 161, 255, 256, 512,
                    2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 10**9, 2**40, 2**53, 2**63 - 1, 2**63,
                    2**64 - 1, -1, -2**31, -2**63]
ints = st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-(2**63), 2**64 - 1))
floats = st.one_of(st.sampled_from([0.0, -0.0, 1e-30, 1e-5, 0.5, 1.0, 1e4, 1e38, float("inf"), float("-inf"),
                                    float("nan")]), st.floats(width=32))
json_scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)

# GGUF values: what GGUFWriter can write (ints it can pack, float32 or float64, strings, bools, int arrays)
gguf_values = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from(INTERESTING_INTS), floats,
                        st.text(max_size=12), st.sampled_from(["linear", "yarn", "llama", "qwen3", "gemma3", "gpt2"]),
                        st.booleans(),
                        st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4), st.none())
META_KEYS = [*GGUF_META, f"{ARCH}.vocab_size", f"{ARCH}.rope.scaling.type", f"{ARCH}.rope.scaling.factor",
             f"{ARCH}.attention.sliding_window", "general.alignment", "general.architecture",
             "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"]
CONFIG_KEYS = [*HF_CONFIG, "head_dim", "rope_scaling", "rope_parameters", "text_config", "quantization",
               "layer_types", "num_experts", "num_experts_per_tok", "sliding_window", "attention_bias",
               "mlp_bias", "partial_rotary_factor"]
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL",
                      "F8_E4M3", "F8_E5M2", "f32", "Q4_0", ""]


def same_geometry(a: int, b: int) -> bool:
    """Two GGML types with the same block size and bytes per block: a swap no loader can detect."""
    try:
        return a != b and GGML_QUANT_SIZES[GGMLQuantizationType(a)] == GGML_QUANT_SIZES[GGMLQuantizationType(b)]
    except (ValueError, KeyError):
        return False


# ------------------------------------------------------------------------------------------------ fixtures
class Target:
    """A pristine checkpoint, its tensors' digests, and counts of what damaged copies of it did."""

    def __init__(self, loader: BoundedLoader, root: Path, pristine: Path, kind: str):
        self.loader, self.root, self.pristine, self.kind = loader, root, pristine, kind
        self.counts: Counter = Counter()
        self.digests = {}
        for keep in (False, True):
            got = loader.load(pristine, keep)
            assert got.outcome == "loaded", got
            self.digests[keep] = got.digest

    def copy(self) -> Path:
        dest = Path(tempfile.mkdtemp(dir=self.root))
        if self.pristine.is_dir():
            return Path(shutil.copytree(self.pristine, dest / self.pristine.name))
        return Path(shutil.copy(self.pristine, dest / self.pristine.name))

    def judge(self, path: Path, keep: bool, *, structural: bool, undetectable: bool = False) -> None:
        """Loads `path` and fails unless the outcome is allowed (see the module doc). Counts every outcome."""
        got = self.loader.load(path, keep)
        if got.outcome == "refused":
            label = f"refused:{got.error}"
            assert "\n" not in got.message and got.message, got.message
        elif got.outcome == "loaded" and got.digest == self.digests[keep]:
            label = "loaded:identical"
        elif got.outcome == "loaded" and not structural:
            label = "loaded:metadata-changed"
        elif got.outcome == "loaded" and undetectable:
            label = "loaded:undetectable-swap"
        elif got.outcome == "loaded":
            label = "garbage"
        else:
            label = got.label
        self.counts[label] += 1
        shutil.rmtree(path.parent, ignore_errors=True)
        assert label.startswith(("refused", "loaded")), (label, got.message[-2000:])


@pytest.fixture(scope="module")
def loader():
    bounded = BoundedLoader(memory_bytes=3 << 30, timeout_s=60)
    yield bounded
    bounded.close()


@pytest.fixture(scope="module")
def gguf_target(loader, tmp_path_factory) -> Target:
    root = tmp_path_factory.mktemp("fuzz-gguf")
    return Target(loader, root, write_gguf(root / "pristine.gguf"), "gguf")


@pytest.fixture(scope="module")
def st_target(loader, tmp_path_factory) -> Target:
    root = tmp_path_factory.mktemp("fuzz-st")
    return Target(loader, root, write_safetensors_dir(root / "pristine"), "safetensors")


# ------------------------------------------------------------------------------------------------ GGUF damage
@st.composite
def gguf_damage(draw):
    kind = draw(st.sampled_from(["metadata", "record", "record", "bytes", "truncate"]))
    if kind == "metadata":
        changes = draw(st.dictionaries(st.one_of(st.sampled_from(META_KEYS), st.text(min_size=1, max_size=20)),
                                       gguf_values, min_size=1, max_size=3))
        return kind, changes
    if kind == "record":
        return kind, draw(st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(["offset", "type", "dim", "n_dims"]),
                                             ints, st.integers(0, 1000)), min_size=1, max_size=3))
    if kind == "bytes":
        return kind, draw(st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), min_size=1, max_size=4))
    return kind, draw(st.integers(0, 10**7))


def apply_gguf_damage(target: Target, damage) -> tuple[Path, bool, bool]:
    """Writes the damaged file; returns (path, structural, undetectable)."""
    kind, what = damage
    if kind == "metadata":
        path = Path(tempfile.mkdtemp(dir=target.root)) / "m.gguf"
        meta = {k: (None if v is None else gguf_value_type(v), v) for k, v in what.items()}
        try:
            write_gguf(path, meta)
        except (ValueError, OverflowError, TypeError, KeyError, struct.error):  # GGUFWriter cannot write it
            path.unlink(missing_ok=True)
        # the declared alignment is layout: the tensors written at 32 must then load unchanged or be refused
        return path, "general.alignment" in what, False
    path = target.copy()
    kv_end, infos_end, records = gguf_layout(path)
    size = path.stat().st_size
    if kind == "record":
        undetectable = False
        for index, field, value, dim in what:
            r = records[index % len(records)]
            if field == "offset":
                patch(path, r.offset_at, "<Q", value % 2**64)
            elif field == "type":
                old = int.from_bytes(path.read_bytes()[r.type_at : r.type_at + 4], "little")
                new = value % 2**32 if value % 3 else next(iter(
                    t.value for t in GGMLQuantizationType if same_geometry(old, t.value)), old)  # some swaps
                undetectable |= same_geometry(old, new)
                patch(path, r.type_at, "<I", new)
            elif field == "dim" and r.n_dims:
                patch(path, r.dims_at + 8 * (dim % r.n_dims), "<Q", value % 2**64)
            else:
                patch(path, r.n_dims_at, "<I", value % 2**32)
        return path, True, undetectable
    if kind == "bytes":
        data = bytearray(path.read_bytes())
        for at, byte in what:
            data[at % infos_end] = byte
        path.write_bytes(bytes(data))
        # a flip in the metadata may change the model legitimately; in the tensor records it must not
        in_records = any(at % infos_end >= kv_end for at, _ in what)
        in_meta = any(at % infos_end < kv_end for at, _ in what)
        return path, in_records and not in_meta, in_records and _types_swapped(target.pristine, path)
    with open(path, "r+b") as f:
        f.truncate(what % (size + 1))
    return path, True, False


def _types_swapped(pristine: Path, damaged: Path) -> bool:
    try:
        before = {t.name: t.tensor_type.value for t in gguf.GGUFReader(pristine).tensors}
        after = {t.name: t.tensor_type.value for t in gguf.GGUFReader(damaged).tensors}
    except Exception:
        return False
    return any(same_geometry(before[n], after[n]) for n in before if n in after)


def fuzz_gguf(target: Target, examples: int, seed_value: int) -> None:
    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(damage=gguf_damage(), keep=st.booleans())
    def check(damage, keep):
        path, structural, undetectable = apply_gguf_damage(target, damage)
        if path.exists():
            target.judge(path, keep, structural=structural, undetectable=undetectable)

    check()


# ------------------------------------------------------------------------------------------------ safetensors damage
@st.composite
def safetensors_damage(draw):
    kind = draw(st.sampled_from(["config", "config-whole", "entry", "entry", "header", "header-bytes", "index",
                                 "truncate"]))
    if kind == "config":
        return kind, draw(st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=10), json_values,
                                          min_size=1, max_size=3))
    if kind in ("config-whole", "header", "index"):
        return kind, draw(json_values)
    if kind == "entry":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename", "shift", "offsets-of",
                                      "swap"]))
        if field == "dtype":
            value = draw(st.sampled_from(SAFETENSORS_DTYPES) | json_scalars)
        elif field in ("shape", "data_offsets"):
            value = draw(st.lists(ints, max_size=4) | json_values)
        elif field in ("shift", "offsets-of", "swap"):
            value = draw(st.integers(-4096, 4096) if field == "shift" else st.integers(0, 1000))
        else:
            value = draw(st.text(max_size=30))
        return kind, (draw(st.integers(0, 1000)), field, value)
    if kind == "header-bytes":
        return kind, draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
    return kind, draw(st.integers(0, 10**6))


def apply_safetensors_damage(target: Target, damage) -> tuple[Path, bool, bool]:
    """Writes the damaged directory; returns (path, structural, undetectable). Undetectable: two tensors of one
    byte size that trade places (the header stays consistent; only checksums, which the format lacks, could
    tell)."""
    kind, what = damage
    root = target.copy()
    st_file, config = root / "model.safetensors", root / "config.json"
    if kind == "config":
        cfg = json.loads(config.read_text())
        for key, value in what.items():
            cfg[key] = value
        config.write_text(json.dumps(cfg))
        return root, False, False
    if kind == "config-whole":
        config.write_text(json.dumps(what))
        return root, False, False
    if kind == "index":
        (root / "model.safetensors.index.json").write_text(json.dumps(what))
        return root, True, False
    if kind == "header":
        rewrite_safetensors_header(st_file, what)
        return root, True, False
    if kind == "entry":
        index, field, value = what
        header = safetensors_header(st_file)
        names = sorted(n for n in header if n != "__metadata__")
        name = names[index % len(names)]
        entry, undetectable = header[name], False
        if field == "drop":
            del header[name]
        elif field == "rename":
            header[value] = header.pop(name)
        elif field == "shift":
            entry["data_offsets"] = [o + value for o in entry["data_offsets"]]
        elif field in ("offsets-of", "swap"):
            other = header[names[value % len(names)]]
            if field == "swap":
                other["data_offsets"], entry["data_offsets"] = entry["data_offsets"], other["data_offsets"]
                sizes = [o["data_offsets"][1] - o["data_offsets"][0] for o in (entry, other)]
                undetectable = other is not entry and sizes[0] == sizes[1]
            else:
                entry["data_offsets"] = list(other["data_offsets"])
        else:
            entry[field] = value
        rewrite_safetensors_header(st_file, header)
        return root, True, undetectable
    data = bytearray(st_file.read_bytes())
    if kind == "header-bytes":
        head = 8 + int.from_bytes(data[:8], "little")
        for at, byte in what:
            data[at % head] = byte
        st_file.write_bytes(bytes(data))
        return root, True, False
    st_file.write_bytes(bytes(data[: what % (len(data) + 1)]))
    return root, True, False


def fuzz_safetensors(target: Target, examples: int, seed_value: int) -> None:
    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(damage=safetensors_damage())
    def check(damage):
        path, structural, undetectable = apply_safetensors_damage(target, damage)
        target.judge(path, False, structural=structural, undetectable=undetectable)

    check()


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("run", RUNS)
def test_fuzz_gguf(gguf_target, run):
    examples, seed_value = budget(run, FAST_EXAMPLES)
    with reporting(f"fuzz_gguf_{run}", gguf_target.counts):
        fuzz_gguf(gguf_target, examples, seed_value)


@pytest.mark.parametrize("run", RUNS)
def test_fuzz_safetensors(st_target, run):
    examples, seed_value = budget(run, FAST_EXAMPLES)
    with reporting(f"fuzz_safetensors_{run}", st_target.counts):
        fuzz_safetensors(st_target, examples, seed_value)
