"""`mlxq quantize` and `mlxq inspect` where the machine says no (issue 10, defect 8): every expected OS error is
one line and exit 2, nothing half-written is left, and inspect counts an mlx-lm 4-bit directory's parameters
as the float model's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import write_safetensors_dir

from mlxq.errors import InvalidRequest
from mlxq.quant import pipeline
from mlxq.quant.recipes import make_recipe

ENV = {**os.environ, "MLXQ_NO_REEXEC": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def mlxq(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "mlxq.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mlxq: error:")]
    assert len(errors) == 1, done.stderr
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_safetensors_dir(tmp_path_factory.mktemp("src") / "tiny")


def no_partials(where: Path) -> bool:
    return not [p for p in where.iterdir() if ".partial-" in p.name]


def test_output_whose_parent_is_a_file(src, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(mlxq("quantize", str(src), "-o", str(tmp_path / "file" / "out"), "--bits", "4"),
                   "is not a directory")


def test_dangling_symlink_output(src, tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    one_line_error(mlxq("quantize", str(src), "-o", str(tmp_path / "out"), "--bits", "4"), "already exists")
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "nowhere").exists() and no_partials(tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("unshare") is None,
                    reason="a private read-only mount needs Linux's unshare")
def test_read_only_output_mount(src, tmp_path):
    """A real read-only filesystem, mounted in a private mount namespace for this one command."""
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"'
    done = mlxq("quantize", str(src), "-o", str(ro / "out"), "--bits", "4",
                prefix=("unshare", "-m", "sh", "-c", cmd, str(ro)))
    one_line_error(done, str(ro / "out"), "not writable")


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("unshare") is None,
                    reason="a private small mount needs Linux's unshare")
def test_disk_full_while_writing(src, tmp_path):
    """An OS error nothing foresees (no space left, half-way through the shards) is one line too, and the
    partial output is removed: the mount is left as empty as it was."""
    small = tmp_path / "small"
    small.mkdir()
    cmd = 'mount -t tmpfs -o size=48k tmpfs "$0" && "$@"; code=$?; ls -A "$0"; exit $code'
    done = mlxq("quantize", str(src), "-o", str(small / "out"), "--bits", "8",
                prefix=("unshare", "-m", "sh", "-c", cmd, str(small)))
    one_line_error(done, "No space left on device")
    assert done.stdout.strip() == "", done.stdout  # what `ls -A` found on the mount afterwards


def test_two_runs_racing_for_one_output(src, tmp_path):
    """Whichever way the two interleave, one writes OUT and the other gets one line and exit 2."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlxq.cli", "quantize", str(src), "-o", str(out), "--bits", "4"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    one_line_error(subprocess.CompletedProcess(args, 2, loser[1], loser[2]), str(out))
    assert (out / "config.json").exists() and no_partials(tmp_path)


def test_the_loser_of_a_race_is_refused_and_cleans_up(src, tmp_path, monkeypatch):
    """The race made certain: the other run's directory appears while this one is writing."""
    out = tmp_path / "out"
    stream = pipeline._stream

    def other_run_finishes_meanwhile(*args, **kwargs):
        stream(*args, **kwargs)
        out.mkdir()
        (out / "theirs").write_text("kept")

    monkeypatch.setattr(pipeline, "_stream", other_run_finishes_meanwhile)
    with pytest.raises(InvalidRequest, match="appeared while quantizing"):
        pipeline.quantize(str(src), out, make_recipe(None, 4, None, {}), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["theirs"] and no_partials(tmp_path)


def test_inspect_counts_mlx_lm_4bit_parameters(src, tmp_path):
    """Packed uint32 words hold 8 weights each: the parameter count is the float model's, the bits per
    parameter near 4 (plus scales, biases and the float norms), not 36."""
    out = tmp_path / "q4"
    assert mlxq("quantize", str(src), "-o", str(out), "--bits", "4", "-g", "32").returncode == 0

    def rows(path: Path) -> dict[str, str]:
        done = mlxq("inspect", str(path))
        assert done.returncode == 0, done.stderr
        pairs = (line.strip().split("  ", 1) for line in done.stdout.strip().splitlines())
        return {k.strip(): v.strip() for k, v in pairs}

    plain, packed = rows(src), rows(out)
    assert packed["parameters"] == plain["parameters"]
    bits = float(re.search(r"\(([\d.]+) bits per parameter\)", packed["size"]).group(1))
    assert 4 < bits < 7, packed["size"]
