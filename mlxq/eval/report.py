"""Outputs of the evaluation commands: JSON and PNG files written whole or not at all, and matplotlib on demand
(an optional extra: `pip install 'mlxq[plot]'`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mlxq.errors import InvalidRequest


def _atomic(path: str | Path, write) -> Path:
    """Calls `write(tmp_path)` on a temporary file next to `path`, then renames it into place."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise InvalidRequest(f"{path}: the directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def pyplot():
    """matplotlib.pyplot with a file-only backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidRequest("--plot needs matplotlib: pip install 'mlxq[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    plt = pyplot()
    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
