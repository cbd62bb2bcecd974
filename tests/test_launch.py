"""`nemo-anchored launch`: both stages through NeMo-Run's local executor end to end, the sbatch
scripts of NeMo-Run's Slurm executor (dry run) and the plain sbatch script, read back the way
Slurm and bash would read them."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nemo_anchored.cli.main import main
from tests.launch import REPO, worker_env

RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
DATA = REPO / "recipes" / "data" / "tiny_sft.jsonl"
QUIET = ["logging.progress=false", "logging.tensorboard=false"]
SHORT = ["trainer.max_steps=2", "anchor.outer_iterations=1", "anchor.inner_steps=2"]
CLUSTER = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "batch", "--account", "acct",
           "--time", "01:00:00", "--preempt-seconds", "120", "--max-requeues", "5",
           "--env", "NCCL_SOCKET_IFNAME=ib0", "--config", str(RECIPE),
           "trainer.micro_batch_size=1", f"data.train_path={DATA}"]


def launch(workdir: Path, *args) -> subprocess.CompletedProcess:
    """`nemo-anchored launch ARGS` started in `workdir`, NeMo-Run's records kept under it."""
    env = worker_env()
    env["NEMORUN_HOME"] = str(workdir / "nemo_run")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    return subprocess.run([sys.executable, "-m", "nemo_anchored", "launch", *args], env=env,
                          cwd=workdir, capture_output=True, text=True, timeout=600)


def torchrun_options(line: str) -> tuple:
    """The torchrun options of a shell command line ({--name: value}) and what follows `-m`."""
    words = shlex.split(line)
    words, options = words[words.index("torchrun") + 1:], {}
    while words[0] != "-m":
        name, sep, value = words.pop(0).partition("=")
        options[name] = value if sep else words.pop(0)
    return options, words[1:]


@pytest.mark.slow
def test_local_executor_runs_both_stages(tmp_path):
    done = launch(tmp_path, "--executor", "local", "--config", str(RECIPE),
                  f"data.train_path={DATA}", *SHORT, *QUIET)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sft, anchored = tmp_path / "runs" / "tiny_cpu_sft", tmp_path / "runs" / "tiny_cpu_anchored"
    assert (sft / "final").is_dir() and (anchored / "final").is_dir()
    # Stage 2 started from the same seed weights as stage 1 and anchored to its final weights.
    config = yaml.safe_load((anchored / "config.yaml").read_text())
    assert config["method"] == "anchored"
    assert (tmp_path / config["model"]["reference_checkpoint"]).resolve() == sft / "final"
    assert (tmp_path / config["model"]["base_checkpoint"]).resolve() == sft / "base"
    steps = [line for line in (anchored / "metrics.jsonl").read_text().splitlines()
             if '"event"' not in line]
    assert len(steps) == 2


@pytest.mark.slow
def test_slurm_dryrun_writes_both_sbatch_scripts(tmp_path):
    done = launch(tmp_path, "--executor", "slurm", "--dryrun", *CLUSTER)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    experiment, = (tmp_path / "nemo_run" / "experiments" / "tiny_cpu").iterdir()
    for stage in ("sft", "anchor"):
        script = (experiment / f"{stage}_sbatch.sh").read_text()
        flags = {line.split("=", 1)[0]: line.split("=", 1)[-1]
                 for line in script.splitlines() if line.startswith("#SBATCH --")}
        assert {k: flags.get(k) for k in ("#SBATCH --nodes", "#SBATCH --ntasks-per-node",
                                          "#SBATCH --gpus-per-node", "#SBATCH --partition",
                                          "#SBATCH --account", "#SBATCH --time",
                                          "#SBATCH --signal")} == {
            "#SBATCH --nodes": "2", "#SBATCH --ntasks-per-node": "1",
            "#SBATCH --gpus-per-node": "4", "#SBATCH --partition": "batch",
            "#SBATCH --account": "acct", "#SBATCH --time": "01:00:00",
            "#SBATCH --signal": "USR1@120"}
        assert "#SBATCH --requeue" in script and "export TORCHX_MAX_RETRIES=5" in script
        for export in ("NCCL_DEBUG=WARN", "NCCL_SOCKET_IFNAME=ib0",
                       "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                       "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120"):
            assert f"\nexport {export}\n" in script, export
        srun, = [line for line in script.splitlines() if line.startswith("srun ")]
        options, command = torchrun_options(srun)
        assert {k: options[k] for k in ("--nnodes", "--nproc-per-node", "--rdzv-backend",
                                        "--rdzv-endpoint", "--node-rank")} == {
            "--nnodes": "2", "--nproc-per-node": "4", "--rdzv-backend": "c10d",
            "--rdzv-endpoint": "$head_node_ip:29500", "--node-rank": "$SLURM_NODEID"}
        assert command[:3] == ["nemo_anchored", stage, "--config"]
        if stage == "anchor":
            assert "model.reference_checkpoint=runs/tiny_cpu_sft/final" in command
        # The task runs in the launch directory: its code directory is linked to it.
        executor = yaml.safe_load((experiment / stage / "configs" /
                                   f"{stage}_executor.yaml").read_text())
        assert executor["packager"]["symlink_from_remote_dir"] == str(tmp_path)


def render(tmp_path, *args) -> str:
    out = tmp_path / "job.sbatch"
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--executor", "sbatch", "--out", str(out), *args])
    assert exit_info.value.code == 0
    return out.read_text()


def test_plain_sbatch_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = f"logging.dir={tmp_path}/out/${{name}}"
    # The container mounts the launch directory only: the inputs must be in it.
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--executor", "sbatch", "--container-image", "nvcr.io/x:1", *CLUSTER,
              out])
    assert exit_info.value.code == 2
    recipe, data = tmp_path / RECIPE.name, tmp_path / DATA.name
    recipe.write_text(RECIPE.read_text())
    data.write_text(DATA.read_text())
    cluster = [str(recipe) if a == str(RECIPE) else a.replace(str(DATA), str(data))
               for a in CLUSTER]
    script = render(tmp_path, "--container-image", "nvcr.io/x:1", *cluster, "optim.lr=2e-4", out)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    flags = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for flag in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=batch",
                 "--account=acct", "--time=01:00:00", f"--chdir={tmp_path}", "--requeue",
                 "--signal=B:USR1@120"):
        assert f"#SBATCH {flag}" in flags, flag
    for export in ("NCCL_SOCKET_IFNAME=ib0", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120",
                   "PYTHONSAFEPATH=1"):  # the image's package, not a checkout's in the workdir
        assert f"\nexport {export}\n" in script, export
    srun = script[script.index("    srun "):script.index(" &\n")].replace("\\\n", " ")
    options, command = torchrun_options(srun)
    assert options == {"--nnodes": "$SLURM_NNODES", "--nproc-per-node": "4",
                       "--rdzv-backend": "c10d", "--rdzv-endpoint": "$head_node:29500",
                       "--rdzv-id": "$SLURM_JOB_ID-$1"}
    assert command == ["nemo_anchored", "$@"]
    assert f"--container-mounts={tmp_path}:{tmp_path}" in srun
    stages = [shlex.split(line)[1:] for line in script.splitlines() if line.startswith("stage ")]
    sft_dir = tmp_path / "out" / "tiny_cpu_sft"
    assert stages == [
        ["sft", "--config", str(recipe), "method=sft", *cluster[-2:], "optim.lr=2e-4", out],
        ["anchor", "--config", str(recipe), *cluster[-2:], "optim.lr=2e-4", out,
         f"model.reference_checkpoint={sft_dir}/final", f"model.base_checkpoint={sft_dir}/base"]]
    assert "requeue" in script and "-ge 5 ]" in script


@pytest.mark.parametrize("args,message", [
    (["method=kl_sft"], "method=kl_sft: `nemo-anchored launch` sets method"),
    (["logging.dir=runs/one"], "logging.dir: both stages would write to 'runs/one'"),
    (["anchor.alpha=2"], "anchor.alpha"),
    (["--nodes", "3"], "trainer.global_batch_size"),
    (["--env", "NO VALUE"], "--env 'NO VALUE': expected KEY=VALUE"),
    # A requeued job resumes each stage from its own checkpoints: none would start both over.
    (["checkpoint.resume=none"], "checkpoint.resume=none: `nemo-anchored launch` sets"),
    (["--partition", "a\nb"], "a line break cannot go into a Slurm batch script directive"),
])
def test_mistakes_stop_before_anything_is_queued(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--executor", "sbatch", "--out", str(tmp_path / "x"), "--config",
              str(RECIPE), "--gpus-per-node", "2", f"data.train_path={DATA}", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_directives_hold_values_with_spaces_and_out_needs_its_folder(tmp_path, monkeypatch,
                                                                     capsys):
    # sbatch splits an #SBATCH line on whitespace outside double quotes.
    workdir = tmp_path / "w dir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    script = render(workdir, "--partition", 'gpu "a"', *CLUSTER[6:])
    assert f'#SBATCH --chdir="{workdir}"' in script.splitlines()
    assert '#SBATCH --partition="gpu \\"a\\""' in script.splitlines()
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--executor", "sbatch", "--out", str(tmp_path / "no" / "job.sbatch"),
              "--config", str(RECIPE), f"data.train_path={DATA}"])
    assert exit_info.value.code == 2
    assert f"--out {tmp_path / 'no' / 'job.sbatch'}: the folder" in capsys.readouterr().err


@pytest.mark.slow
def test_local_executor_does_not_start_the_anchor_stage_after_a_failed_sft(tmp_path):
    # An earlier run's final weights are there, and the SFT stage fails at its start (its
    # checkpoint folder holds only a damaged checkpoint): the anchor stage must not train
    # toward the earlier final.
    sft = tmp_path / "runs" / "tiny_cpu_sft"
    (sft / "final").mkdir(parents=True)
    damaged = sft / "checkpoints" / "step_0000002"
    damaged.mkdir(parents=True)
    (damaged / "complete.json").write_text('{"format_version": 1, "glob')
    done = launch(tmp_path, "--executor", "local", "--config", str(RECIPE),
                  f"data.train_path={DATA}", *SHORT, *QUIET)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stage sft ended FAILED" in done.stderr
    assert not (tmp_path / "runs" / "tiny_cpu_anchored").exists()


def test_missing_nemo_run_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nemo_run", None)  # what Python does when it is absent
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--executor", "local", "--config", str(RECIPE)])
    assert exit_info.value.code == 2
    assert "nemo-anchored[launch]" in capsys.readouterr().err
