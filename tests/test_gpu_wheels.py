"""bench/gpu_wheels.sh install: a wheel carried in two parts over two device calls is put back
together byte for byte and checked against its SHA-256 before anything is installed; a part
lost between the calls, or a damaged one, stops the install with a message that says which.

The script runs on a copy of bench/ beside hand-made parts, with a `python3` on the PATH that
records the pip command it is given instead of installing."""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "model-0.1-py3-none-any.whl"


@pytest.fixture
def carried(tmp_path):
    """A repository copy with .whl/a (the first half of NAME and a small wheel) and .whl/b (the
    second half and NAME's SHA-256); returns (repo, NAME's bytes, run)."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_wheels.sh", repo / "bench")
    data = os.urandom(100_001)  # odd: the halves differ in length
    half = (len(data) + 1) // 2
    for part, chunk in (("a", data[:half]), ("b", data[half:])):
        (repo / ".whl" / part).mkdir(parents=True)
        (repo / ".whl" / part / f"{NAME}.part-{'ab'.index(part)}").write_bytes(chunk)
    (repo / ".whl" / "a" / "small-1.0-py3-none-any.whl").write_bytes(b"small")
    (repo / ".whl" / "b" / f"{NAME}.sha256").write_text(
        f"{hashlib.sha256(data).hexdigest()}  {NAME}\n")
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "pip_args"}\n')
    stub.chmod(0o755)

    def run():
        env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}",
               "SITE": str(tmp_path / "site"), "JOINED": str(tmp_path / "joined")}
        return subprocess.run(["bash", str(repo / "bench" / "gpu_wheels.sh"), "install"],
                              env=env, capture_output=True, text=True, timeout=60)

    return repo, data, run


def test_parts_are_joined_checked_and_installed(carried, tmp_path):
    repo, data, run = carried
    result = run()
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "joined" / NAME).read_bytes() == data
    args = (tmp_path / "pip_args").read_text().split()
    assert args[:3] == ["-m", "pip", "install"] and "--no-index" in args
    assert args[args.index("--target") + 1] == str(tmp_path / "site")
    assert sorted(Path(a).name for a in args if a.endswith(".whl")) == [
        NAME, "small-1.0-py3-none-any.whl"]
    assert "installed 2 wheels" in result.stdout


def test_a_part_lost_between_the_calls_is_named(carried, tmp_path):
    repo, _, run = carried
    (repo / ".whl" / "a" / f"{NAME}.part-0").unlink()
    result = run()
    assert result.returncode == 1
    assert f"{NAME}: 1 of its 2 parts here" in result.stderr
    assert "released between the calls" in result.stderr
    assert not (tmp_path / "pip_args").exists()


def test_a_damaged_part_is_refused(carried, tmp_path):
    repo, _, run = carried
    part = repo / ".whl" / "b" / f"{NAME}.part-1"
    damaged = bytearray(part.read_bytes())
    damaged[7] ^= 1
    part.write_bytes(bytes(damaged))
    result = run()
    assert result.returncode == 1
    assert f"{NAME} put back together differs from its SHA-256" in result.stderr
    assert not (tmp_path / "pip_args").exists()
