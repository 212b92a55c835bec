"""Finished variants of a long benchmark kept on disk, so that a stopped run can resume without redoing them.

Each result is stored with a fingerprint of what determines it: the variant's label and the run's inputs (weights,
token hashes, settings, peer versions: `inputs`), plus the sha256 of every source file of the benchmark's own code
that the process had loaded when the result was recorded (`code`: mlxq's modules and the bench scripts). A stored
result is reused only when all of that matches now, file by file; anything else runs again.

    store = VariantStore(work / "results", inputs, root=repo)
    hit = store.get(label)               # {"result", "stored", "commit"} or None
    ...
    store.put(label, result)
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
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


def loaded_sources(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of each Python module this process has loaded from under `root` (the code a result
    recorded now can depend on; a superset), except this module: how results are stored does not change them."""
    root = root.resolve()
    out = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or not file.endswith(".py") or Path(file).resolve() == Path(__file__).resolve():
            continue
        path = Path(file).resolve()
        if path.is_relative_to(root) and path.exists():
            out[str(path.relative_to(root))] = file_digest(path)
    return dict(sorted(out.items()))


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
    """Results in `directory`, one JSON file per (label, inputs); reused only when the recorded code is unchanged."""

    def __init__(self, directory: Path, inputs: dict, root: Path):
        self.directory, self.inputs, self.root = Path(directory), inputs, Path(root)

    def _path(self, label: str, extra: dict | None) -> Path:
        return self.directory / f"{label}-{digest([label, self.inputs, extra or {}])[:20]}.json"

    def get(self, label: str, extra: dict | None = None) -> dict | None:
        """The stored record of `label` (`result`, `stored`, `commit`) if its label, inputs (`extra`: this variant's
        own, e.g. what it was aimed at) and every source file it recorded match now; else None."""
        path = self._path(label, extra)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("label") != label or record.get("inputs") != self.inputs or record.get("extra") != (extra or {}):
            return None  # a digest-prefix collision or a hand-edited file
        code = record.get("code") or {}
        for rel, sha in code.items():
            file = self.root / rel
            if not file.is_file() or file_digest(file) != sha:
                return None
        return record if code else None

    def put(self, label: str, result: dict, extra: dict | None = None) -> Path:
        return write_json(self._path(label, extra), {
            "label": label,
            "inputs": self.inputs,
            "extra": extra or {},
            "code": loaded_sources(self.root),
            "commit": commit(self.root),
            "stored": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "result": result,
        })
