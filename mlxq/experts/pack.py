"""Expert packs: a MoE model's routed experts on disk, laid out for streaming.

One file per MoE layer, its experts back to back. Each expert is ONE contiguous block, aligned to 16 KiB (Apple's
page size, and a multiple of every O_DIRECT block size), holding its gate, up and down projections' packed
weights, scales and biases (MLX affine, each tensor 64-byte aligned inside the block). One positioned read brings
in a whole expert; experts next to each other in the file are read together. A JSON manifest records, per layer,
the block layout and, per expert, its offset, size and CRC-32, plus the id of the model the packs belong to.

    OUT/config.json                mlx-lm config + "mlxq_experts": {"manifest": ..., "id": ..., "order": ...}
    OUT/model*.safetensors         every other tensor (kept resident)
    OUT/experts/manifest.json
    OUT/experts/layer-003.pack     one per MoE layer

Expert p of a pack is expert p as the model's router numbers it. With `--order coactivation` the experts were
renumbered (router rows permuted to match) and `permutation[p]` is the source's number for expert p.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxq.errors import FormatError
from mlxq.glibc import WriteBehind

ALIGN = 16384  # expert blocks start and end on 16 KiB boundaries
TENSOR_ALIGN = 64  # tensors inside a block
PACK_DIR = "experts"
MANIFEST = "manifest.json"
FORMAT, VERSION = "mlxq-expert-packs", 1
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases")
CONFIG_KEY = "mlxq_experts"

_NP_DTYPES = {"uint32": np.uint32, "float16": np.float16, "float32": np.float32}  # what affine quantization gives


def _aligned(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class BlockTensor:
    """One tensor of an expert block: `gate_proj.weight` at `offset` bytes into the block."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.np_dtype).itemsize

    @property
    def np_dtype(self):
        return _NP_DTYPES[self.dtype]


@dataclass(frozen=True)
class Expert:
    offset: int  # into the layer's file
    size: int  # payload bytes (the block is padded to the layer's stride)
    crc32: int


@dataclass
class LayerPack:
    layer: int
    module: str  # the MoE block's path in the model, e.g. "model.layers.3.mlp"
    file: str  # relative to the pack directory
    tensors: list[BlockTensor]
    quantization: dict[str, dict[str, int]]  # projection -> {"bits", "group_size"}
    payload: int  # bytes of one expert's block before padding
    stride: int  # bytes from one expert's block to the next (payload padded to ALIGN)
    experts: list[Expert]
    permutation: list[int] | None = None
    first: int = 0  # the model's number of expert 0 here (a rank's share of the layer starts further in)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def layout_key(self) -> tuple:
        """Layers with equal keys can share slots: their experts have the same tensors and quantization."""
        return tuple((t.name, t.shape, t.dtype) for t in self.tensors), tuple(sorted(
            (p, q["bits"], q["group_size"]) for p, q in self.quantization.items()))

    def dims(self, proj: str) -> tuple[int, int]:
        """(out, in) of one projection, unpacked."""
        w = next(t for t in self.tensors if t.name == f"{proj}.weight")
        return w.shape[0], w.shape[1] * 32 // self.quantization[proj]["bits"]

    def check_block(self, path: Path, p: int, payload: memoryview | bytes) -> None:
        """A block read from disk is the one the manifest describes (else a FormatError naming layer and expert)."""
        want, where = self.experts[p], f"{path}: layer {self.layer} expert {self.first + p}"
        if len(payload) != want.size:
            raise FormatError(f"{where}: short read ({len(payload)} of {want.size} bytes)")
        got = zlib.crc32(payload)
        if got != want.crc32:
            raise FormatError(f"{where}: checksum mismatch (CRC-32 {got:08x}, manifest {want.crc32:08x})")


@dataclass
class Packs:
    """An opened set of expert packs (files checked for size; blocks are checked when read)."""

    root: Path  # the pack directory
    id: str
    order: str
    layers: dict[int, LayerPack] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(lp.payload * lp.n_experts for lp in self.layers.values())

    def path(self, lp: LayerPack) -> Path:
        return self.root / lp.file

    def share(self, owned: dict[int, tuple[int, int]]) -> Packs:
        """One rank's part of the packs (`mlxq.distributed`): layer -> the experts [first, stop) it owns, numbered
        from 0 there; each keeps its offset, so reads still land on its block. Layers not in `owned` are left out."""
        out = Packs(self.root, self.id, self.order)
        for layer, (first, stop) in owned.items():
            lp = self.layers[layer]
            out.layers[layer] = replace(lp, experts=lp.experts[first:stop], first=lp.first + first)
        return out

    def read_layer(self, layer: int) -> dict[str, mx.array]:
        """Every expert of one layer, checked, as stacked arrays `{proj}.{part}` [experts, ...] (fully resident)."""
        lp = self.layers[layer]
        path = self.path(lp)
        with open(path, "rb") as f:
            f.seek(lp.experts[0].offset)
            data = f.read(lp.stride * lp.n_experts)
        if len(data) < lp.stride * (lp.n_experts - 1) + lp.payload:
            short = lp.first + len(data) // lp.stride
            raise FormatError(f"{path}: layer {layer} expert {short}: short read (the file is truncated)")
        for p in range(lp.n_experts):
            lp.check_block(path, p, memoryview(data)[p * lp.stride : p * lp.stride + lp.payload])
        blocks = np.frombuffer(data, np.uint8, lp.stride * lp.n_experts).reshape(lp.n_experts, lp.stride)
        out = {}
        for t in lp.tensors:
            part = np.ascontiguousarray(blocks[:, t.offset : t.offset + t.nbytes]).view(t.np_dtype)
            out[t.name] = mx.array(part.reshape(lp.n_experts, *t.shape))
        return out

    def resident_weights(self) -> dict[str, mx.array]:
        """Every layer's experts under the model's tensor names (`model.layers.3.mlp.experts.gate_proj.weight`)."""
        out = {}
        for layer, lp in self.layers.items():
            for name, arr in self.read_layer(layer).items():
                out[f"{lp.module}.experts.{name}"] = arr
        return out


def has_packs(config: dict[str, Any]) -> bool:
    return isinstance(config.get(CONFIG_KEY), dict)


def open_packs(model_dir: Path, config: dict[str, Any]) -> Packs:
    """The packs a model directory's config.json points to; FormatError when the manifest is unreadable, is for
    another model, or a pack file is missing or has the wrong size."""
    entry = config[CONFIG_KEY]
    manifest, model_id = entry.get("manifest", f"{PACK_DIR}/{MANIFEST}"), entry.get("id")
    if not isinstance(manifest, str) or not isinstance(model_id, str):
        raise FormatError(f"{Path(model_dir) / 'config.json'}: '{CONFIG_KEY}' needs a manifest path and an id")
    return read_manifest(Path(model_dir) / manifest, model_id)


def open_pack_dir(path: Path) -> Packs:
    """A model directory with packs, or a pack directory itself (its manifest, whichever model it is for)."""
    path = Path(path)
    if (path / "config.json").exists():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise FormatError(f"{path / 'config.json'}: invalid JSON ({e})") from None
        if has_packs(config):
            return open_packs(path, config)
    if (path / MANIFEST).exists():
        return read_manifest(path / MANIFEST)
    raise FormatError(f"{path}: no expert packs (neither {MANIFEST} nor a config.json naming one)")


def read_manifest(manifest_path: Path, expected_id: str | None = None) -> Packs:
    try:
        raw = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{manifest_path}: expert pack manifest is missing") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{manifest_path}: unreadable manifest ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise FormatError(f"{manifest_path}: not an mlxq expert pack manifest (version {VERSION})")
    if expected_id is not None and raw.get("id") != expected_id:
        raise FormatError(
            f"{manifest_path}: manifest id {raw.get('id')} is not the model's ({expected_id} in config.json): "
            "these packs belong to another model"
        )
    packs = Packs(manifest_path.parent, raw.get("id", ""), raw.get("order", "identity"))
    try:
        for key, lr in raw["layers"].items():
            lp = LayerPack(
                int(key), lr["module"], lr["file"],
                [BlockTensor(t["name"], t["offset"], tuple(t["shape"]), t["dtype"]) for t in lr["tensors"]],
                lr["quantization"], lr["payload"], lr["stride"],
                [Expert(*e) for e in lr["experts"]], lr.get("permutation"),
            )
            packs.layers[lp.layer] = lp
            _check_layer(manifest_path, lp)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(f"{manifest_path}: malformed layer entry ({type(e).__name__}: {e})") from None
    for lp in packs.layers.values():
        path = packs.path(lp)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FormatError(f"{path}: layer {lp.layer}: pack file is missing") from None
        want = lp.stride * lp.n_experts
        if size != want:
            first_bad = min(size // lp.stride, lp.n_experts - 1)
            raise FormatError(
                f"{path}: layer {lp.layer} expert {first_bad}: pack is {size} bytes, the manifest says {want}"
                + (" (truncated)" if size < want else "")
            )
    return packs


def _check_layer(manifest_path: Path, lp: LayerPack) -> None:
    """A layer entry that is self-consistent: aligned blocks in order, tensors inside the payload, known dtypes."""
    where = f"{manifest_path}: layer {lp.layer}"
    if not lp.experts or lp.stride <= 0 or lp.stride % ALIGN or not 0 < lp.payload <= lp.stride:
        raise FormatError(f"{where}: block size {lp.payload} / stride {lp.stride} is not a {ALIGN}-aligned layout")
    for p, e in enumerate(lp.experts):
        if e.offset != p * lp.stride or e.size != lp.payload:
            raise FormatError(f"{where} expert {p}: offset {e.offset} / size {e.size} do not follow the layout")
    names = {f"{proj}.{part}" for proj in PROJECTIONS for part in PARTS}
    for t in lp.tensors:
        bad_shape = len(t.shape) != 2 or any(not isinstance(d, int) or d <= 0 for d in t.shape)
        if bad_shape or t.dtype not in _NP_DTYPES or t.offset < 0 or t.offset + t.nbytes > lp.payload or (
                t.name not in names):
            raise FormatError(f"{where}: tensor '{t.name}' ({t.dtype} at {t.offset}) does not fit the expert block")
    if {t.name for t in lp.tensors} != names or set(lp.quantization) != set(PROJECTIONS):
        raise FormatError(f"{where}: the block must hold gate, up and down weights, scales and biases")
    for proj, q in lp.quantization.items():
        w = next(t for t in lp.tensors if t.name == f"{proj}.weight")
        if q["bits"] not in (2, 3, 4, 5, 6, 8) or w.shape[-1] * 32 % q["bits"] or q["group_size"] <= 0:
            raise FormatError(f"{where}: {proj} quantization {q} does not fit its weight {list(w.shape)}")


def describe(packs: Packs) -> list[tuple[str, str]]:
    """Rows for `mlxq inspect`: what the packs hold and one expert block's layout."""
    lps = sorted(packs.layers.values(), key=lambda lp: lp.layer)
    lp = lps[0]
    quant = ", ".join(f"{p} {q['bits']}-bit g{q['group_size']}" for p, q in lp.quantization.items())
    layout = "; ".join(f"{t.name} {t.dtype}{list(t.shape)} @{t.offset}" for t in lp.tensors)
    same = all(x.layout_key() == lp.layout_key() for x in lps)
    return [
        ("expert packs", f"{packs.root.name}/: {len(lps)} layers ({lps[0].layer}..{lps[-1].layer}) x "
                         f"{lp.n_experts} experts, order {packs.order}"),
        ("experts size", f"{sum(x.stride * x.n_experts for x in lps) / 1e6:.1f} MB on disk "
                         f"({packs.nbytes / 1e6:.1f} MB of blocks)"),
        ("expert block", f"{lp.payload} bytes, every {lp.stride} ({ALIGN // 1024} KiB aligned); {quant}"
                         + ("" if same else " (layer 0's; layouts differ between layers)")),
        ("block layout", layout),
    ]


def check_model(packs: Packs, moe_blocks: dict[str, Any]) -> None:
    """The packs fit the model: one pack per MoE block (path -> SparseMoE), same expert count and shapes."""
    by_module = {lp.module: lp for lp in packs.layers.values()}
    for path, block in moe_blocks.items():
        lp = by_module.get(path)
        if lp is None:
            raise FormatError(f"{packs.root / MANIFEST}: no pack for the MoE block '{path}' (packs of another model?)")
        experts = block.experts
        n = experts.gate_proj.num_experts if "gate_proj" in experts else experts.gate_up_proj.num_experts
        for proj in PROJECTIONS:
            w = experts[proj]["weight"]
            want = (n, w.shape[1], w.shape[2])
            got = (lp.n_experts, *lp.dims(proj))
            if got != want:
                raise FormatError(
                    f"{packs.root / MANIFEST}: layer {lp.layer} {proj}: packs hold {got[0]} experts of "
                    f"{got[1]}x{got[2]}, the model has {want[0]} of {want[1]}x{want[2]} (packs of another model?)"
                )
    extra = set(by_module) - set(moe_blocks)
    if extra:
        raise FormatError(f"{packs.root / MANIFEST}: pack for '{sorted(extra)[0]}', which is not a MoE block in "
                          "this model (packs of another model?)")


# ------------------------------------------------------------------------------------------------ writing
class PackWriter:
    """Collects one layer's quantized experts (projection by projection, stacked or one expert at a time) and
    writes the layer's pack as soon as the layer is complete, then drops it: memory holds one layer's experts."""

    def __init__(self, root: Path, model_id: str, order: str, expected: dict[int, int]):
        """`expected`: layer -> number of (projection, expert) parts it will receive."""
        self.dir = root / PACK_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.id, self.order = model_id, order
        self.expected = dict(expected)
        self.pending: dict[int, dict] = {}
        self.layers: dict[int, dict] = {}
        self.permutations: dict[int, list[int]] = {}

    def add(self, layer: int, module: str, proj: str, first: int, parts: dict[str, np.ndarray], quant: dict) -> None:
        """Projection `proj` of experts first.. (`parts`: weight/scales/biases, [n, ...] numpy arrays)."""
        entry = self.pending.setdefault(layer, {"module": module, "parts": {}, "quant": {}})
        n = next(iter(parts.values())).shape[0]
        for i in range(n):
            entry["parts"][(proj, first + i)] = {k: v[i] for k, v in parts.items()}
        entry["quant"][proj] = quant
        self.expected[layer] -= n
        if self.expected[layer] == 0:
            self._write(layer, self.pending.pop(layer))

    def _write(self, layer: int, entry: dict) -> None:
        parts = entry["parts"]
        n = 1 + max(e for _, e in parts)
        tensors, offset = [], 0
        for proj in PROJECTIONS:
            for part in PARTS:
                a = parts[(proj, 0)][part]
                if a.dtype.name not in _NP_DTYPES:
                    raise FormatError(f"layer {layer} {proj}.{part}: {a.dtype} cannot go into an expert pack")
                tensors.append(BlockTensor(f"{proj}.{part}", offset, tuple(a.shape), a.dtype.name))
                offset = _aligned(offset + a.nbytes, TENSOR_ALIGN)
        payload = tensors[-1].offset + tensors[-1].nbytes
        stride = _aligned(payload, ALIGN)
        perm = self.permutations.get(layer, list(range(n)))
        name = f"layer-{layer:03d}.pack"
        experts = []
        block = bytearray(stride)
        with open(self.dir / name, "wb") as f:
            behind = WriteBehind(f.fileno())
            for p, e in enumerate(perm):
                block[:] = bytes(stride)
                for t in tensors:
                    proj, part = t.name.split(".")
                    data = np.ascontiguousarray(parts[(proj, e)][part]).view(np.uint8).reshape(-1)
                    block[t.offset : t.offset + t.nbytes] = data.tobytes()
                experts.append(Expert(p * stride, payload, zlib.crc32(memoryview(block)[:payload])))
                f.write(block)
                behind.wrote((p + 1) * stride)
            f.flush()
            os.fsync(f.fileno())
        self.layers[layer] = {
            "module": entry["module"],
            "file": name,
            "tensors": [asdict(t) for t in tensors],
            "quantization": entry["quant"],
            "payload": payload,
            "stride": stride,
            "experts": [[x.offset, x.size, x.crc32] for x in experts],
            **({"permutation": perm} if layer in self.permutations else {}),
        }

    def close(self, model: dict[str, Any]) -> dict[str, Any]:
        """Writes the manifest (every layer must be complete); returns config.json's `mlxq_experts` entry."""
        missing = sorted(k for k, v in self.expected.items() if v)
        if missing:
            raise FormatError(f"layer {missing[0]}: {self.expected[missing[0]]} expert tensors were never written")
        head = {"format": FORMAT, "version": VERSION, "id": self.id, "order": self.order, "alignment": ALIGN,
                "model": model}
        # one line per layer: readable at the top, and a 512-expert layer does not become 2000 lines
        layers = ",\n".join(f'  "{k}": {json.dumps(v, separators=(",", ":"))}' for k, v in sorted(self.layers.items()))
        text = json.dumps(head, indent=1)[:-2] + ',\n "layers": {\n' + layers + "\n }\n}\n"
        (self.dir / MANIFEST).write_text(text)
        return {"manifest": f"{PACK_DIR}/{MANIFEST}", "id": self.id, "order": self.order}
