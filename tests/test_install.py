"""`pip install .` (not editable) gives a working tool: the package goes from a copy of the
working tree into a fresh virtual environment, which then runs, from a folder outside the
repository, `--version`, both stages of the shipped tiny recipe named by its name, and `eval`
on a conversion's model.yaml with a key=value override.

The fresh environment gets the dependencies already installed in the project's venv through a
.pth file (the package itself is installed with --no-deps, so this checks the package, not
install_requires). The copy and the environment sit at fixed paths under build/ (ignored by
git). The extension `make build` compiled is put where the build looks for its output, so the
install keeps it when it is newer than every source and header (setup.py's ordinary
up-to-date check) and compiles it again otherwise: the compile itself is `make build`'s,
which runs before the tests.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from nemo_anchored import __version__
from tests.launch import REPO

WORK = REPO / "build" / "install-test"


def _copy_working_tree(dest: Path) -> None:
    """The files a clone of this working tree would have (tracked or not ignored, as they are
    now) into ``dest``, whose previous copy is removed, with this checkout's built extension
    (its modification time kept) in the build's output folder."""
    shutil.rmtree(dest, ignore_errors=True)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True, text=True).stdout
    for name in sorted(set(filter(None, listed.split("\0")))):
        rel = Path(name)
        # Skip files deleted since the last commit, and paths reached through a symlink (the
        # link itself is copied).
        if not os.path.lexists(REPO / rel) or any((REPO / p).is_symlink() for p in rel.parents
                                                  if p != Path(".")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel, follow_symlinks=False)
    # setuptools' platform build folder: build/lib.<platform>-<cache tag>.
    built = dest / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    (built / "nemo_anchored").mkdir(parents=True)
    for extension in (REPO / "nemo_anchored").glob("_C.*"):
        shutil.copy2(extension, built / "nemo_anchored" / extension.name)


def _run(*argv, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_a_plain_install_runs_the_shipped_recipe_from_anywhere(tmp_path):
    from nemo_anchored.config import GPTConfig, load_config
    from nemo_anchored.models.hf_import import model_yaml

    src, venv = WORK / "src", WORK / "venv"
    _copy_working_tree(src)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig"
                                ".get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(sys.executable, "-m", "pip", "--python", venv / "bin/python", "install", "-q",
         "--no-build-isolation", "--no-deps", ".", cwd=src, env=env, timeout=1200)

    tool = venv / "bin" / "nemo-anchored"
    assert _run(tool, "--version", cwd=tmp_path, env=env).stdout.strip() == \
        f"nemo-anchored {__version__}"
    quiet = ["logging.progress=false", "logging.tensorboard=false"]
    sft = _run(tool, "sft", "--config", "tiny_cpu", "trainer.max_steps=2", *quiet,
               cwd=tmp_path, env=env)
    # The megatron warnings known to be irrelevant are filtered (megatron_compat).
    assert "Transformer Engine and Apex are not installed" not in sft.stderr
    # The installed recipe was used, its data path resolved against the recipe's folder.
    run_cfg = load_config(tmp_path / "runs/tiny_cpu_sft/config.yaml", check_paths=False)
    assert run_cfg.data.train_path == str(site / "nemo_anchored/recipes/data/tiny_sft.jsonl")
    _run(tool, "anchor", "--config", "tiny_cpu",
         "model.reference_checkpoint=runs/tiny_cpu_sft/final", "anchor.inner_steps=1", *quiet,
         cwd=tmp_path, env=env)
    assert (tmp_path / "runs/tiny_cpu_anchored/final").is_dir()

    # eval takes the model.yaml a conversion writes; its tokenizer folder is overridden here.
    (tmp_path / "model.yaml").write_text(model_yaml(GPTConfig.of(run_cfg.model),
                                                    tmp_path / "converted"))
    _run(tool, "eval", "--checkpoint", "runs/tiny_cpu_anchored/final", "--config", "model.yaml",
         "--tasks", "countdown", "--limit", "1", "--max-new-tokens", "2", "--out", "eval.json",
         "data.tokenizer=byte", cwd=tmp_path, env=env)
    results = json.loads((tmp_path / "eval.json").read_text())
    assert list(results["tasks"]) == ["countdown"]
