"""`mlxq doctor FILE.gguf`: what in a GGUF file llama.cpp, Ollama or mlxq will trip over, one plain line per
finding, and (`--fix`) the repairs that make llama.cpp load it, written to a new file.

The divergences are the ones the field hits with the hybrid Qwen3.5 files (see `names`): Ollama's `ssm_dt` without
".bias" (llama.cpp: "missing tensor 'blk.0.ssm_dt.bias'"), b and a fused as `ssm_ba`, 3 rope sections where
llama.cpp wants 4, sections wider than a head (llama.cpp aborts), value heads left in HF's grouped order, a vision
tower counted in the same file's tensor count (llama.cpp: "wrong number of tensors"); and for every file: blocks
missing tensors their siblings have, tensors nothing knows, unknown tensor types, no tokenizer or chat template.

Severity: "error" (llama.cpp or mlxq refuses the file, or computes garbage), "warning" (loads, but something is
missing or unusual), "note" (a harmless divergence). Exit status: 2 with errors, 1 with warnings, else 0.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGUFValueType

from mlxq.errors import FormatError
from mlxq.formats.gguf import names
from mlxq.formats.gguf.checks import check_gguf
from mlxq.formats.gguf.reader import Header, Strings, TensorRecord, read_bytes, read_header, v_heads_tiled
from mlxq.formats.gguf.writer import GGUFOut, TensorOut, Value
from mlxq.kernels import kquants

SEVERITY = {"note": 0, "warning": 1, "error": 2}
HYBRID_REORDERED = ("qwen35", "qwen35moe")  # llama.cpp reads these with value heads in tiled order
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "note"
    message: str
    fixable: bool = False

    def line(self) -> str:
        return f"{self.severity}: {self.message}" + (" [--fix repairs it]" if self.fixable else "")


@dataclass
class Repairs:
    """What --fix changes: metadata set or removed, tensors renamed, dropped, split by rows, reordered."""

    meta: dict[str, Value] = field(default_factory=dict)
    drop_meta: set[str] = field(default_factory=set)
    rename: dict[str, str] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    split: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused tensor -> parts, equal row ranges
    reorder: dict[str, tuple[names.Permutation, ...]] = field(default_factory=dict)  # to llama.cpp's order


def status(findings: list[Finding]) -> int:
    """The exit status: the worst severity found."""
    return max((SEVERITY[f.severity] for f in findings), default=0)


def examine(path: Path) -> tuple[list[Finding], Repairs, Header]:
    """Findings for one file and the repairs for those that are fixable (structural damage the header parser
    cannot get past raises FormatError instead)."""
    findings: list[Finding] = []
    repairs = Repairs()
    try:  # what llama.cpp's loader refuses structurally (offsets, sizes, alignment, types, token ids)
        check_gguf(path)
    except FormatError as e:
        findings.append(Finding("error", str(e)))
    header = read_header(path, check=False)
    meta = header.meta
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        findings.append(Finding("error", "no 'general.architecture': neither llama.cpp nor mlxq can tell what "
                                         "model this is"))
        return findings, repairs, header
    unknown_types = [t for t in header.tensors.values() if t.kind.startswith("type ")]
    for t in unknown_types:
        findings.append(Finding("error", f"tensor '{t.name}' has {t.kind}, which no GGML version defines"))
    undecodable = sorted({t.kind for t in header.tensors.values() if not t.kind.startswith("type ")
                          and t.kind not in ("F32", "F16", "BF16") and not kquants.supports(t.kind)
                          and not _gguf_py_decodes(t.kind)})
    if undecodable:
        findings.append(Finding("error", f"mlxq cannot decode tensor type(s) {', '.join(undecodable)}"))
    if arch not in names.ARCHITECTURES:
        findings.append(Finding("warning", f"architecture '{arch}': mlxq does not run it (it runs "
                                           f"{', '.join(sorted(names.ARCHITECTURES))}); only generic checks follow"))
    else:
        _check_tensors(header, arch, findings, repairs)
        if names.ARCHITECTURES[arch].hybrid:
            _check_hybrid(header, arch, findings, repairs)
    _check_tokenizer(meta, findings)
    return findings, repairs, header


def _gguf_py_decodes(kind: str) -> bool:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import _type_traits

    return GGMLQuantizationType[kind] in _type_traits


# ------------------------------------------------------------------------------------------------ checks
def _check_tensors(header: Header, arch: str, findings: list[Finding], repairs: Repairs) -> None:
    """Tensor count against what the header's own blocks imply, tensors nothing knows, foreign tensors."""
    meta = header.meta
    blocks = int(meta.get(f"{arch}.block_count", 0))
    foreign = [n for n in header.tensors if n.startswith(names.FOREIGN_PREFIXES)]
    if foreign:
        findings.append(Finding("error", f"{len(foreign)} of the {len(header.tensors)} tensors the header counts "
                                         f"belong to another model in the same file (vision tower: "
                                         f"'{foreign[0]}', ...); llama.cpp's text model refuses the file "
                                         f"('wrong number of tensors')", fixable=True))
        repairs.drop.update(foreign)
    n_layers = blocks - int(meta.get(f"{arch}.{names.NEXTN_LAYERS}", 0))
    unknown = [n for n in header.tensors if n not in foreign and n != "rope_freqs.weight"
               and names.hf_name(arch, n, n_layers) is None and names.split(arch, n) is None]
    if unknown:
        findings.append(Finding("warning", f"{len(unknown)} tensor(s) with no known meaning for '{arch}' "
                                           f"('{unknown[0]}'{', ...' if len(unknown) > 1 else ''}); mlxq refuses them"))
    per_block: dict[int, set[str]] = defaultdict(set)
    for n in header.tensors:
        if m := _BLOCK.match(n):
            per_block[int(m.group(1))].add(m.group(2))
    empty = [i for i in range(blocks) if i not in per_block]
    if empty:
        findings.append(Finding("error", f"blocks {_ranges(empty)} of the {blocks} the header declares have no "
                                         "tensors (an incomplete conversion)"))
    beyond = sorted(i for i in per_block if i >= blocks)
    if beyond:
        findings.append(Finding("error", f"tensors for blocks {_ranges(beyond)}, past the {blocks} blocks the header "
                                         "declares"))
    # blocks of one kind (DeltaNet, attention, MoE) have the same tensors: any a sibling has, each must have
    kinds: dict[str, list[int]] = defaultdict(list)
    for i, parts in per_block.items():
        if i < n_layers:
            kinds[_block_kind(parts)].append(i)
    for kind, members in kinds.items():
        union = set().union(*(per_block[i] for i in members))
        short = {i: sorted(union - per_block[i]) for i in members if union - per_block[i]}
        if short:
            first = next(iter(short.values()))
            findings.append(Finding("error", f"{len(short)} {kind} block(s) ({_ranges(sorted(short))}) lack tensors "
                                             f"the other {len(members) - len(short)} have ('{first[0]}'...): the "
                                             f"file has {len(header.tensors)} tensors, fewer than its blocks need"))
    if "token_embd.weight" not in header.tensors:
        findings.append(Finding("error", "no 'token_embd.weight' (the token embeddings)"))


def _block_kind(parts: set[str]) -> str:
    if any(p.startswith(("ssm_", "attn_qkv")) for p in parts):
        return "DeltaNet"
    return "MoE" if any("_exps" in p for p in parts) else "decoder"


def _check_hybrid(header: Header, arch: str, findings: list[Finding], repairs: Repairs) -> None:
    """Qwen3.5 / Qwen3-Next: the divergences between llama.cpp's converter, Ollama's, and what llama.cpp reads."""
    meta, tensors = header.meta, header.tensors
    key = lambda k: f"{arch}.{k}"  # noqa: E731
    for k in ("ssm.conv_kernel", "ssm.state_size", "ssm.group_count", "ssm.time_step_rank", names.SSM_INNER_SIZE):
        if key(k) not in meta:
            findings.append(Finding("error", f"metadata '{key(k)}' is missing (the DeltaNet layers' sizes)"))
    bare_dt = sorted(n for n in tensors if n.endswith(".ssm_dt"))
    if bare_dt:
        findings.append(Finding("error", f"{len(bare_dt)} tensor(s) 'blk.N.ssm_dt' lack the '.bias' suffix (Ollama's "
                                         f"spelling); llama.cpp refuses the file (\"missing tensor "
                                         f"'{bare_dt[0]}.bias'\")", fixable=True))
        repairs.rename.update({n: n + ".bias" for n in bare_dt})
    fused = sorted(n for n in tensors if n.endswith(".ssm_ba.weight"))
    if fused and arch in HYBRID_REORDERED:
        findings.append(Finding("error", f"{len(fused)} tensor(s) 'blk.N.ssm_ba' hold b and a fused (Ollama's "
                                         "packing); llama.cpp's qwen35 reads them as 'ssm_beta' and 'ssm_alpha'",
                                fixable=True))
        repairs.split.update({n: (n.replace(".ssm_ba.", ".ssm_beta."), n.replace(".ssm_ba.", ".ssm_alpha."))
                              for n in fused})
    if arch in HYBRID_REORDERED:
        _check_rope_sections(meta, arch, findings, repairs)
        if not v_heads_tiled(meta, arch):
            _check_v_heads(header, arch, findings, repairs)
    kv_key = key("attention.head_count_kv")
    kv = meta.get(kv_key)
    if isinstance(kv, np.ndarray):
        shown = ", ".join(map(str, kv.tolist()[:8])) + (", ..." if kv.size > 8 else "")
        findings.append(Finding("error", f"'{kv_key}' is a per-layer array [{shown}] (Ollama's form); llama.cpp's "
                                         f"{arch} wants one number (it says: tensor 'blk.N.attn_k.weight' has wrong "
                                         "shape)", fixable=True))
        repairs.meta[kv_key] = Value(int(kv.max()), GGUFValueType.UINT32)
    ollama_keys = [k for k in meta if k.removeprefix(f"{arch}.") in
                   (*names.OLLAMA_ROPE_SECTIONS, names.OLLAMA_V_HEADS_TILED, names.OLLAMA_MROPE_INTERLEAVED)]
    if ollama_keys:
        findings.append(Finding("note", f"Ollama's own metadata ({', '.join(ollama_keys)}); llama.cpp ignores it"))


def _check_rope_sections(meta: dict, arch: str, findings: list[Finding], repairs: Repairs) -> None:
    """llama.cpp's qwen35 requires 4 sections summing to at most the head size (else it aborts in ggml)."""
    key = f"{arch}.{names.ROPE_SECTIONS}"
    sections = meta.get(key)
    head = int(meta.get(f"{arch}.attention.key_length") or 0)
    rotary = int(meta.get(f"{arch}.{names.ROPE_DIMENSION_COUNT}") or head)
    fixed = _sections(meta, arch, rotary, head)
    if sections is None:
        findings.append(Finding("error", f"metadata '{key}' is missing; llama.cpp's {arch} requires it "
                                         "(\"key not found in model\")", fixable=True))
    elif len(sections) != 4:
        findings.append(Finding("error", f"'{key}' has {len(sections)} elements {list(map(int, sections))} (Ollama "
                                         f"writes HF's 3); llama.cpp wants 4 (\"wrong array length\")", fixable=True))
    elif head and int(np.sum(sections)) > head:
        findings.append(Finding("error", f"'{key}' {list(map(int, sections))} sums to more than the head size "
                                         f"{head}; llama.cpp aborts (GGML_ASSERT(sect_dims <= ne0))", fixable=True))
    else:
        return
    repairs.meta[key] = Value(fixed, GGUFValueType.ARRAY, GGUFValueType.INT32)


def _sections(meta: dict, arch: str, rotary: int, head: int) -> list[int]:
    """4 rope sections llama.cpp accepts: the file's own (or Ollama's copies), padded with 0; else the rotary pairs
    dealt out to three sections as Qwen's interleaved MRoPE does (64 rotary dims: [11, 11, 10, 0]), which is what
    text needs: every pair on a position llama.cpp fills for text (the fourth section's stays 0)."""
    found = meta.get(f"{arch}.{names.ROPE_SECTIONS}")
    for alt in names.OLLAMA_ROPE_SECTIONS:
        found = found if found is not None else meta.get(f"{arch}.{alt}")
    if found is not None and (not head or int(np.sum(found)) <= head):
        return [int(x) for x in found][:4] + [0] * max(0, 4 - len(found))
    pairs = rotary // 2
    return [len(range(r, pairs, 3)) for r in range(3)] + [0]


def _check_v_heads(header: Header, arch: str, findings: list[Finding], repairs: Repairs) -> None:
    """Value heads in HF's grouped order (an Ollama file that says so): llama.cpp computes garbage with them."""
    config = _hybrid_config(header, arch)
    n_layers = config["num_hidden_layers"]
    movable, stuck = {}, []
    for name, rec in header.tensors.items():
        fused = names.split(arch, name)
        hf = names.hf_name(arch, name, n_layers)
        transforms = fused[1].transforms if fused else names.transforms(arch, hf) if hf else ()
        perms = tuple(t for t in transforms if isinstance(t, names.TiledVHeads))  # for a split: per part
        if not perms:
            continue
        if all(_can_permute(rec, t, config) for t in perms):
            movable[name] = perms
        else:
            stuck.append(name)
    findings.append(Finding("error", f"the DeltaNet value heads are in HF's grouped order "
                                     f"('{arch}.{names.OLLAMA_V_HEADS_TILED}' is false); llama.cpp reads {arch} in "
                                     f"its tiled order and computes garbage", fixable=not stuck))
    if stuck:
        findings.append(Finding("error", f"{len(stuck)} quantized tensor(s) ('{stuck[0]}'...) cannot be reordered "
                                         "without requantizing: their blocks span several value heads"))
        return
    repairs.reorder.update(movable)
    repairs.meta[f"{arch}.{names.OLLAMA_V_HEADS_TILED}"] = Value(True, GGUFValueType.BOOL)


def _can_permute(rec: TensorRecord, t: names.Permutation, config: dict) -> bool:
    if t.axis == 0 or rec.kind in ("F32", "F16", "BF16"):
        return True
    from mlxq.formats.gguf.reader import _unit_order

    return _unit_order(t.order(rec.shape[-1], config), kquants.BLOCK_SIZES[rec.kind][0]) is not None


def _hybrid_config(header: Header, arch: str) -> dict[str, Any]:
    from mlxq.formats.gguf.reader import _config

    return _config(header.meta, arch, names.ARCHITECTURES[arch], header.tensors, header.path)


def _check_tokenizer(meta: dict, findings: list[Finding]) -> None:
    if "tokenizer.ggml.model" not in meta or not isinstance(meta.get("tokenizer.ggml.tokens"), Strings):
        findings.append(Finding("error", "no tokenizer ('tokenizer.ggml.model' / 'tokenizer.ggml.tokens'): llama.cpp "
                                         "and mlxq cannot turn text into tokens"))
    elif meta.get("tokenizer.ggml.model") == "gpt2" and "tokenizer.ggml.pre" not in meta:
        findings.append(Finding("warning", "no 'tokenizer.ggml.pre': llama.cpp falls back to its default "
                                           "pre-tokenizer, which splits text differently"))
    if "tokenizer.ggml.eos_token_id" not in meta:
        findings.append(Finding("warning", "no 'tokenizer.ggml.eos_token_id': generation does not know where to stop"))
    if not isinstance(meta.get("tokenizer.chat_template"), str):
        findings.append(Finding("warning", "no chat template ('tokenizer.chat_template'): chat requests fall back to "
                                           "plain text"))


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (at most a few runs)."""
    runs, start = [], None
    for a, b in zip(xs, [*xs[1:], None], strict=True):
        start = a if start is None else start
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = None
    return ", ".join(runs[:4]) + (", ..." if len(runs) > 4 else "")


# ------------------------------------------------------------------------------------------------ repair
def repair(path: Path, out: Path) -> list[Finding]:
    """Writes `path` with every fixable finding repaired to `out` (atomically; `out` may not be `path`) and returns
    the findings left in the new file."""
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise FormatError(f"{out}: --fix writes a new file; give an output other than the input")
    findings, repairs, header = examine(path)
    meta = header.meta
    arch = meta["general.architecture"]
    config = _hybrid_config(header, arch) if repairs.reorder else {}
    metadata = {}
    for key, value in meta.items():
        if key in repairs.drop_meta or key == "general.alignment":
            continue
        kind, item = header.types[key]
        if isinstance(value, Strings):
            value = value.read(path)
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        metadata[key] = Value(value, GGUFValueType(kind), None if item is None else GGUFValueType(item))
    metadata.update(repairs.meta)
    plan: list[tuple[TensorOut, TensorRecord, slice | None]] = []
    for name, rec in header.tensors.items():
        if name in repairs.drop:
            continue
        if name in repairs.split:
            parts = repairs.split[name]
            rows = rec.shape[0] // len(parts)
            for i, part in enumerate(parts):
                plan.append((TensorOut(part, (rows, *rec.shape[1:]), rec.kind), rec, slice(i * rows, (i + 1) * rows)))
            continue
        plan.append((TensorOut(repairs.rename.get(name, name), rec.shape, rec.kind), rec, None))
    with GGUFOut(out, arch, metadata, [p[0] for p in plan]) as writer:
        for target, rec, rows in plan:
            data = read_bytes(path, rec).reshape(rec.shape[0], -1)  # rows (a vector: its elements)
            if rows is not None:
                data = data[rows]
            perms = repairs.reorder.get(rec.name, ())
            for t in perms:
                data = _to_tiled(data, rec, t, config)
            writer.write(target.name, data)
    return examine(out)[0]


def _to_tiled(data: np.ndarray, rec: TensorRecord, t: names.Permutation, config: dict) -> np.ndarray:
    """Moves grouped value heads to llama.cpp's tiled order on a tensor's bytes [rows, row bytes]: rows as they
    are, columns in whole elements (float) or whole blocks (quantized)."""
    if t.axis == 0:
        return data[t.order(data.shape[0], config)]
    cols = rec.shape[-1]
    order = t.order(cols, config)
    unit = 1 if rec.kind in ("F32", "F16", "BF16") else kquants.BLOCK_SIZES[rec.kind][0]
    blocks = order.reshape(-1, unit)[:, 0] // unit
    width = data.shape[-1] // (cols // unit)
    return data.reshape(*data.shape[:-1], cols // unit, width)[..., blocks, :].reshape(data.shape)
