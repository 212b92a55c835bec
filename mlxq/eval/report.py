"""Pictures from the evaluation commands: PNG files written whole or not at all, with matplotlib loaded on demand
(an optional extra: `pip install 'mlxq[plot]'`)."""

from __future__ import annotations

import os
from pathlib import Path

from mlxq.errors import InvalidRequest


def pyplot():
    """matplotlib.pyplot with a file-only backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidRequest("--plot needs matplotlib: pip install 'mlxq[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_target(path: str | Path) -> Path:
    """Checks, before any long work, that a PNG can be written at `path` (matplotlib importable, directory there)."""
    pyplot()
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise InvalidRequest(f"--plot {path}: the directory {path.parent} does not exist")
    return path


def save_figure(fig, path: str | Path) -> Path:
    """Writes `fig` as a PNG at `path` through a temporary file, so the file appears complete or not at all."""
    plt = pyplot()
    path = plot_target(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path
