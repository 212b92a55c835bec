"""Pinned text for calibration and evaluation: exllamav2 0.3.2's standard calibration set, fetched from its PyPI
wheel (sha256-checked, cached) like the default model.

The Wikipedia file is split at a document boundary: its first half joins the calibration mix (with web text,
code, technical and multilingual text), its second half is held back for perplexity / KL evaluation, so a
model is never scored on text it was calibrated on.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlxq.errors import InvalidRequest
from mlxq.formats.fetch import PinnedFile, fetch

_WHEEL = "exllamav2==0.3.2"
_DIR = "exllamav2/conversion/standard_cal_data"
CORPUS: dict[str, PinnedFile] = {
    name: PinnedFile(_WHEEL, f"{_DIR}/{name}.utf8", sha)
    for name, sha in {
        "c4": "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
        "code": "23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221",
        "multilingual": "609be9ea4ee44cfb92a29d9579e4d744383652ebc1dacd7dc370a1db4aaf3459",
        "technical": "9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc",
        "wiki": "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
    }.items()
}
CALIBRATION_PARTS = ("wiki_head", "c4", "code", "technical", "multilingual")
DEFAULT_CALIBRATION = "default"  # the name `--calibrate` with no file stands for
HELDOUT = "wiki_heldout"  # the name of the held-back evaluation text

_DOC_TAG = re.compile(r"^</?doc\b[^>]*>\s*$", re.MULTILINE)
_BLANKS = re.compile(r"\n{3,}")


def _read(name: str) -> str:
    return fetch(CORPUS[name]).read_text(encoding="utf-8")


def _wiki_halves() -> tuple[str, str]:
    text = _read("wiki")
    cut = text.find("<doc ", len(text) // 2)
    return tuple(_BLANKS.sub("\n\n", _DOC_TAG.sub("", part)).strip() + "\n" for part in (text[:cut], text[cut:]))


def calibration_texts() -> dict[str, str]:
    """The default calibration mix, one text per source (callers interleave them)."""
    head, _ = _wiki_halves()
    return {part: head if part == "wiki_head" else _read(part) for part in CALIBRATION_PARTS}


def heldout_text() -> str:
    """Held-back Wikipedia text (never part of the calibration mix)."""
    return _wiki_halves()[1]


def read_text_file(path: str | Path) -> str:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(f"{path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{path}: cannot read as UTF-8 text ({e})") from None
    if not text.strip():
        raise InvalidRequest(f"{path}: the text file is empty")
    return text
