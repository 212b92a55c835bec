"""Finished variants of a long benchmark kept on disk, so that a stopped run can resume without redoing them.

Each result is stored with a fingerprint of what determines it: the variant's label and the run's inputs (weights,
token hashes, settings, peer versions: `inputs`), plus the sha256 of each piece of source the variant names (`code`:
the runner's functions and the modules it and the scoring run through, as `source_digests` units). A stored result is
reused only when all of that matches now, unit by unit; anything else runs again. Code the variant does not name (an
unrelated module, another runner in the same bench file) can change without invalidating it.

    store = VariantStore(work / "results", inputs, root=repo)
    hit = store.get(label, extra, code)   # {"result", "stored", "commit"} or None
    ...
    store.put(label, result, extra, code)
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from mlxq.bench.record import write_json


def digest(value) -> str:
    """sha256 of a JSON-able value (token lists, settings), independent of dict order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over every file under `root` (relative names and contents): a weights directory."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return digest({str(p.relative_to(root)): file_digest(p) for p in files})


def source_digests(root: Path, units: Iterable[str]) -> dict[str, str]:
    """Unit -> sha256 of its source under `root`. A unit is a file ("mlxq/eval/metrics.py"), every Python file in a
    folder ("mlxq/quant/"), or one function or class of a file, methods by their dotted name
    ("bench/quant_quality.py:run_mlxq", "mlxq/api.py:Model.logits": its text, decorators included). A unit that is
    not there is a ValueError (a fingerprint naming nothing would never change)."""
    root = Path(root)
    out = {}
    for unit in units:
        rel, _, name = unit.partition(":")
        path = root / rel
        if name:
            out[unit] = hashlib.sha256(_definition(path, name).encode()).hexdigest()
        elif rel.endswith("/") and path.is_dir():
            files = sorted(path.rglob("*.py"))
            out[unit] = digest({str(f.relative_to(path)): file_digest(f) for f in files})
        elif path.is_file():
            out[unit] = file_digest(path)
        else:
            raise ValueError(f"{unit}: no such file or folder under {root}")
    return dict(sorted(out.items()))


def _definition(path: Path, name: str) -> str:
    """The source text of the function or class `name` (dotted for a method) in the Python file `path`."""
    text = path.read_text() if path.is_file() else ""
    body = ast.parse(text).body
    node = None
    for part in name.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise ValueError(f"{path}:{name}: no such function or class")
        body = node.body
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return "\n".join(text.splitlines()[first - 1 : node.end_lineno])


def commit(root: Path) -> str | None:
    """The git commit `root` is checked out at (for the record), with "+dirty" when its files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


class VariantStore:
    """Results in `directory`, one JSON file per (label, inputs); reused only when the named code is unchanged."""

    def __init__(self, directory: Path, inputs: dict, root: Path):
        self.directory, self.inputs, self.root = Path(directory), inputs, Path(root)

    def _path(self, label: str, extra: dict | None) -> Path:
        return self.directory / f"{label}-{digest([label, self.inputs, extra or {}])[:20]}.json"

    def get(self, label: str, extra: dict | None = None, code: Iterable[str] = ()) -> dict | None:
        """The stored record of `label` (`result`, `stored`, `commit`) if its label, inputs (`extra`: this variant's
        own, e.g. what it was aimed at) and the digests of the code units it depends on (`code`) match now; else
        None. A record stored under other units (another fingerprint: e.g. every file a process had loaded) is
        not reused."""
        path = self._path(label, extra)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("label") != label or record.get("inputs") != self.inputs or record.get("extra") != (extra or {}):
            return None  # a digest-prefix collision or a hand-edited file
        units = sorted(code)
        if not units or sorted(record.get("code") or {}) != units:
            return None
        try:
            return record if record["code"] == source_digests(self.root, units) else None
        except ValueError:
            return None

    def put(self, label: str, result: dict, extra: dict | None = None, code: Iterable[str] = ()) -> Path:
        return write_json(self._path(label, extra), {
            "label": label,
            "inputs": self.inputs,
            "extra": extra or {},
            "code": source_digests(self.root, code),
            "commit": commit(self.root),
            "stored": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "result": result,
        })
