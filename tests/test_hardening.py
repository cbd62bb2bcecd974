"""No silent corruption, no lost work (issue 10): a diverging run stops before its weights or
checkpoints take in a non-finite value, a collapsed run stops, one run per run directory, a
resume skips unusable checkpoints loudly and refuses changed settings, events are logged once
across a resume, and training toward the base is refused.

The training runs are single-process CLI runs of recipes/tiny_cpu.yaml (a few steps each); the
multi-process side (every rank stops together) is in tests/test_training.py's torchrun launch.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_anchored.checkpoint.format import FORMAT_VERSION, MARKER
from nemo_anchored.config import ConfigError, load_config
from nemo_anchored.training.run_lock import LOCK_NAME, RunLock
from tests.launch import REPO as ROOT, worker_env

RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"
ENV = worker_env()
QUIET = ["logging.progress=false", "logging.tensorboard=false"]
# Reliable real triggers on the tiny recipe (no test hooks in the library):
# AdamW at lr 1e20 without clipping: step 1 is fine, step 2 has a finite loss (ln V) and a NaN
# gradient, which megatron's fp32 optimizer would apply.
NAN_GRADIENT = ["optim.lr=1e20", "optim.clip_grad=0"]
# lr 1e3 collapses the model to a uniform output: from step 3 on the gradient is exactly 0.
COLLAPSE = ["optim.lr=1e3", "trainer.stop_on_collapse_steps=3"]


def cli_args(command, run_dir, *overrides):
    return [sys.executable, "-m", "nemo_anchored", command, "--config", str(RECIPE),
            f"logging.dir={run_dir}", *QUIET, *overrides]


def cli(command, run_dir, *overrides):
    return subprocess.run(cli_args(command, run_dir, *overrides), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps(run_dir):
    return [m["step"] for m in metrics(run_dir) if "event" not in m]


def events(run_dir):
    return [(m["step"], m["event"], m.get("outer")) for m in metrics(run_dir) if "event" in m]


def checkpoints(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step_*"))


def policy_is_finite(checkpoint: Path, scratch: Path) -> bool:
    """Every policy tensor of the checkpoint is finite (read without megatron or a process
    group, through torch.distributed.checkpoint's conversion to one torch.save file)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, scratch)
    tensors = {k: v for k, v in torch.load(scratch, weights_only=False).items()
               if isinstance(v, torch.Tensor) and v.is_floating_point()
               and not k.startswith(("optimizer.", "snapshot."))}
    assert "embedding.word_embeddings.weight" in tensors
    return all(bool(v.isfinite().all()) for v in tensors.values())


def assert_stopped(done, *phrases):
    assert done.returncode == 2, done.stderr[-3000:]
    for phrase in phrases:
        assert phrase in done.stderr, (phrase, done.stderr[-3000:])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A 2-step sft run with a checkpoint after each step (and RUN_DIR/base, RUN_DIR/final)."""
    run_dir = tmp_path_factory.mktemp("hardening") / "sft"
    done = cli("sft", run_dir, "trainer.max_steps=2", "checkpoint.save_every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def copy_run(run_dir, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# ------------------------------------------------------------------------------ divergence


@pytest.mark.slow
def test_non_finite_gradient_stops_before_the_update(tmp_path):
    run_dir = tmp_path / "run"
    done = cli("sft", run_dir, *NAN_GRADIENT, "trainer.max_steps=4", "checkpoint.save_every=1",
               "checkpoint.resume=none")
    assert_stopped(done, "non-finite gradient at step 2", "optim.lr")
    assert steps(run_dir) == [1]
    # Step 2's update never happened, so no checkpoint holds it: the last one is finite.
    assert checkpoints(run_dir) == ["step_0000001"]
    assert policy_is_finite(run_dir / "checkpoints" / "step_0000001", tmp_path / "weights.pt")


@pytest.mark.slow
def test_a_save_refuses_non_finite_weights(tmp_path):
    # SGD at lr 3e38 with a huge (coupled) weight decay: step 1's gradient is finite, the
    # update overflows the weights to inf.
    run_dir = tmp_path / "run"
    done = cli("sft", run_dir, "optim.name=sgd", "optim.lr=3e38", "optim.weight_decay=1e10",
               "trainer.max_steps=1", "checkpoint.resume=none")
    assert_stopped(done, "policy weights are not finite after step 1",
                   f"refusing to save {run_dir / 'checkpoints' / 'step_0000001'}")
    assert checkpoints(run_dir) == [] and not (run_dir / "final").exists()


@pytest.mark.slow
def test_collapse_stops_the_sft_stage(tmp_path):
    run_dir = tmp_path / "run"
    done = cli("sft", run_dir, *COLLAPSE, "trainer.max_steps=8", "checkpoint.resume=none")
    assert_stopped(done, "training collapsed", "exactly 0 at steps 3..5", "ln 259",
                   "optim.lr=1000.0", "trainer.stop_on_collapse_steps=0 disables")
    assert steps(run_dir) == [1, 2, 3, 4, 5]
    assert not (run_dir / "final").exists()


@pytest.mark.slow
def test_collapse_stops_the_anchored_stage(tmp_path, sft_run):
    run_dir = tmp_path / "run"
    done = cli("anchor", run_dir, *COLLAPSE, f"model.base_checkpoint={sft_run / 'base'}",
               f"model.reference_checkpoint={sft_run / 'final'}", "anchor.outer_iterations=2",
               "anchor.inner_steps=4", "checkpoint.resume=none")
    assert_stopped(done, "training collapsed", "exactly 0 at steps 3..5", "optim.lr=1000.0")
    assert steps(run_dir) == [1, 2, 3, 4, 5]
    assert not (run_dir / "final").exists()


def test_collapse_threshold_is_validated():
    with pytest.raises(ConfigError, match="trainer.stop_on_collapse_steps"):
        load_config(RECIPE, ["trainer.stop_on_collapse_steps=-1"], check_paths=False)
    assert load_config(RECIPE, check_paths=False).trainer.stop_on_collapse_steps == 20


# ------------------------------------------------------------------------- run directory


def test_run_lock_admits_one_holder(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    # Another process (record locks belong to the process): refused, naming us.
    script = ("import sys; from nemo_anchored.training.run_lock import RunLock\n"
              "try:\n    RunLock(sys.argv[1]).acquire()\nexcept Exception as e:\n"
              "    print(type(e).__name__, e)")
    refused = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=ENV, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    message = refused.stdout
    assert message.startswith("RunDirectoryLocked"), refused.stderr[-2000:]
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
    assert "no longer running" not in message and "logging.dir" in message
    first.release()
    # A clean release leaves no record behind: the next holder has nothing to report.
    second = RunLock(tmp_path)
    assert second.acquire() is None
    second.release()


@pytest.mark.slow
def test_lock_of_a_killed_process_does_not_block(tmp_path):
    script = ("import os, signal, sys; from nemo_anchored.training.run_lock import RunLock; "
              "RunLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=ENV, cwd=ROOT)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    record = json.loads((tmp_path / LOCK_NAME).read_text())  # its record stays behind
    assert (record["host"], record["pid"]) == (socket.gethostname(), killed.pid)
    lock = RunLock(tmp_path)
    note = lock.acquire()  # the OS dropped the dead process's lock: not blocked
    assert f"pid {killed.pid}" in note and "no longer running" in note
    assert "ended without releasing its lock" in note
    lock.release()


@pytest.mark.slow
def test_second_run_in_one_directory_is_refused(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    args = ["trainer.max_steps=20", "checkpoint.save_every=10", "checkpoint.resume=none"]
    with open(log, "w") as output:
        first = subprocess.Popen(cli_args("sft", run_dir, *args), env=ENV, cwd=ROOT,
                                 stdout=output, stderr=subprocess.STDOUT)
    try:
        lock_file, deadline = run_dir / LOCK_NAME, time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if lock_file.exists() and lock_file.read_text().strip():
                break
            time.sleep(0.05)
        # The first run holds the lock: paused (SIGSTOP) it keeps holding it, however long the
        # second command takes to start up and reach it, without a long run to outlast it.
        first.send_signal(signal.SIGSTOP)
        try:
            second = cli("sft", run_dir, *args)
        finally:
            first.send_signal(signal.SIGCONT)
    finally:
        first.wait(timeout=600)
    assert_stopped(second, f"run directory {run_dir} is in use by another run",
                   f"pid {first.pid}")
    assert first.returncode == 0, log.read_text()[-3000:]
    assert steps(run_dir) == list(range(1, 21))  # the first run's, each once
    assert checkpoints(run_dir) == ["step_0000010", "step_0000020"]


# -------------------------------------------------------------------------------- resume


def corrupt_marker(checkpoint: Path) -> None:
    (checkpoint / MARKER).write_text('{"format_version": 1, "glob')  # a torn write


@pytest.mark.slow
def test_resume_skips_unusable_checkpoints_loudly_and_never_starts_over_silently(
        tmp_path, sft_run):
    run_dir = copy_run(sft_run, tmp_path)
    corrupt_marker(run_dir / "checkpoints" / "step_0000002")
    done = cli("sft", run_dir, "trainer.max_steps=3", "checkpoint.save_every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert f"resume skips an unusable checkpoint: checkpoint {run_dir}/checkpoints/" \
           f"step_0000002: unreadable {MARKER}" in output
    assert f"resumed from {run_dir}/checkpoints/step_0000001 at step 1" in output
    assert steps(run_dir) == [1, 2, 3]

    # Nothing usable left: stop before anything is written, and say how to start over.
    for name in checkpoints(run_dir):
        corrupt_marker(run_dir / "checkpoints" / name)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    done = cli("sft", run_dir, "trainer.max_steps=3", "checkpoint.save_every=1")
    assert_stopped(done, f"no usable checkpoint to resume from in {run_dir / 'checkpoints'}",
                   "step_0000003", "checkpoint.resume=none", "truncates")
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


WEIGHTS_MOVED = r"""
import sys, torch
from nemo_anchored.config import GPTConfig, load_config
from nemo_anchored.checkpoint.sharded import load_model_weights
from nemo_anchored.models.gpt import build_gpt_model
from nemo_anchored.parallel.distributed import model_parallel
cfg = load_config(sys.argv[1], check_paths=False)
with model_parallel(1, 1, seed=0):
    before, after = (build_gpt_model(GPTConfig.of(cfg.model)) for _ in range(2))
    load_model_weights(sys.argv[2], before)
    load_model_weights(sys.argv[3], after)
    moved = max((a - b).abs().max().item() for (_, a), (_, b) in zip(
        after.state_dict().items(), before.state_dict().items())
        if isinstance(a, torch.Tensor) and a.is_floating_point())
print(moved)
"""


def test_each_step_runs_and_logs_its_own_lr_of_the_schedule(tmp_path):
    # megatron's formula at steps 1..4 (warm-up 2, then linear decay to min_lr at the last):
    # each step logs the lr it ran at, the last min_lr; and step 1 does move the weights (run
    # after the update, the schedule gave it lr 0 and logged step 2's lr for it).
    run = tmp_path / "run"
    done = cli("sft", run, "trainer.max_steps=4", "optim.warmup_steps=2",
               "optim.decay_style=linear", "optim.lr=0.001", "optim.min_lr=0.0001",
               "optim.name=sgd", "checkpoint.save_every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [m["lr"] for m in metrics(run) if "event" not in m]
    assert logged == pytest.approx([0.0005, 0.001, 0.00055, 0.0001], rel=1e-12)
    moved = subprocess.run([sys.executable, "-c", WEIGHTS_MOVED, str(run / "config.yaml"),
                            str(run / "base"), str(run / "checkpoints" / "step_0000001")],
                           env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert float(moved.stdout.strip().splitlines()[-1]) > 0


def test_folders_that_cannot_be_written_stop_the_run_before_training(tmp_path):
    """Found at the start, naming the key, not at the first save after the training (a file
    where a folder must go stands in for a read-only or foreign file system)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = cli("sft", tmp_path / "run", "trainer.max_steps=2",
               f"checkpoint.dir={blocker / 'checkpoints'}")
    assert_stopped(done, f"checkpoint.dir: cannot write to {blocker / 'checkpoints'}: Not a "
                   "directory")
    assert steps(tmp_path / "run") == []
    done = cli("sft", blocker / "run", "trainer.max_steps=2")
    assert_stopped(done, f"cannot write {blocker / 'run'}")
    assert "Traceback" not in done.stderr


def test_a_run_directory_for_a_checkpoint_is_named_with_the_one_meant(sft_run):
    # Refused at validation, naming the key, with the checkpoint probably meant.
    for key, folder, meant in [
            ("model.base_checkpoint", sft_run, "a run directory? its final weights are "
                                               f"{sft_run / 'final'}"),
            ("checkpoint.resume", sft_run / "checkpoints", "the newest complete checkpoint "
                                                         f"inside is {sft_run}/checkpoints/"
                                                         "step_0000002")]:
        with pytest.raises(ConfigError) as refused:
            load_config(RECIPE, [f"{key}={folder}"])
        assert str(refused.value) == f"{key}: {folder} is not a checkpoint (no {MARKER}, no " \
                                     f"checkpoint files); {meant}"


@pytest.mark.slow
def test_starting_over_sets_the_earlier_runs_checkpoints_aside(tmp_path, sft_run):
    """Run B starts over in run A's directory and stops (as at a preemption) before A's last
    step: a resume must continue B, not take A's later checkpoint for B's."""
    run_dir = copy_run(sft_run, tmp_path)  # A: checkpoints at steps 1 and 2
    earlier = {name: (run_dir / "checkpoints" / name / MARKER).read_bytes()
               for name in checkpoints(run_dir)}
    done = cli("sft", run_dir, "trainer.max_steps=1", "checkpoint.save_every=1",
               "checkpoint.resume=none", "optim.clip_grad=0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    aside = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and f"are moved to {aside[0]}" in done.stdout
    assert {p.name: (p / MARKER).read_bytes() for p in aside[0].iterdir()} == earlier
    assert checkpoints(run_dir) == ["step_0000001"]  # B's own
    done = cli("sft", run_dir, "trainer.max_steps=2", "checkpoint.save_every=1",
               "optim.clip_grad=0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_0000001 at step 1" in done.stdout
    assert steps(run_dir) == [1, 2]


@pytest.mark.slow
def test_resume_with_changed_settings_is_refused_unless_allowed(tmp_path, sft_run):
    run_dir = copy_run(sft_run, tmp_path)
    changed = ["trainer.seed=99", "optim.lr=0.002", "trainer.max_steps=3"]
    before = (run_dir / "metrics.jsonl").read_bytes()
    done = cli("sft", run_dir, *changed)
    assert_stopped(done, "trainer.seed=1234 in the checkpoint, 99 now",
                   "optim.lr=0.001 in the checkpoint, 0.002 now",
                   "checkpoint.allow_changed_settings=true")
    assert "trainer.global_batch_size" not in done.stderr  # unchanged: not named
    assert (run_dir / "metrics.jsonl").read_bytes() == before

    done = cli("sft", run_dir, *changed, "checkpoint.allow_changed_settings=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: checkpoint" in done.stdout and "resuming anyway" in done.stdout
    assert steps(run_dir) == [1, 2, 3]
    # The resumed step runs at the new lr (tiny_cpu's schedule is constant), not at the
    # checkpoint's, which its optimizer and scheduler state carry.
    assert [m["lr"] for m in metrics(run_dir) if "event" not in m] == [0.001, 0.001, 0.002]


@pytest.mark.slow
def test_resume_with_another_objective_data_or_optimizer_is_refused(tmp_path, sft_run):
    """Each would resume without failing into another run (or fail loading the optimizer state
    as if the files were damaged): refused before anything is written, naming what changed."""
    run_dir = copy_run(sft_run, tmp_path)
    data = tmp_path / "reversed.jsonl"  # the same examples in another order
    lines = (ROOT / "recipes" / "data" / "tiny_sft.jsonl").read_text().splitlines()
    data.write_text("\n".join(reversed(lines)) + "\n")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    done = cli("sft", run_dir, "trainer.max_steps=3", "method=dft", f"data.train_path={data}",
               "optim.name=sgd", "optim.decay_style=linear", "model.dtype=bfloat16",
               "anchor.alpha=0.9")
    assert_stopped(done, "method=sft in the checkpoint, dft now",
                   "data=96 examples", "optim.name=adamw in the checkpoint, sgd now",
                   "optim.decay_style=constant in the checkpoint, linear now",
                   "model.dtype=float32 in the checkpoint, bfloat16 now")
    assert "anchor.alpha" not in done.stderr  # an sft checkpoint: the anchor is not its
    # Another optimizer's state cannot be loaded at all: refused even when changes are allowed.
    done = cli("sft", run_dir, "trainer.max_steps=3", "optim.name=sgd",
               "checkpoint.allow_changed_settings=true")
    assert_stopped(done, "optim.name=adamw in the checkpoint, sgd now",
                   "Its optimizer state cannot be loaded with another optim.name")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_events_are_logged_once_across_a_resume(tmp_path, sft_run):
    run_dir = tmp_path / "run"
    args = [f"model.base_checkpoint={sft_run / 'base'}",
            f"model.reference_checkpoint={sft_run / 'final'}", "anchor.outer_iterations=2",
            "anchor.inner_steps=2"]
    done = cli("anchor", run_dir, *args, "checkpoint.resume=none")
    assert done.returncode == 0, done.stderr[-3000:]
    whole = events(run_dir)
    # A run stopped after the first outer iteration's checkpoint (and after everything it
    # logged at that step), resumed from that boundary.
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    shutil.rmtree(run_dir / "final")
    done = cli("anchor", run_dir, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "at step 2" in done.stdout
    assert events(run_dir) == whole
    assert [e for e in whole if e[1].startswith("outer")] == [
        (0, "outer_iteration_start", 0), (2, "outer_iteration_end", 0),
        (2, "outer_iteration_start", 1), (4, "outer_iteration_end", 1)]
    assert steps(run_dir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_sft_resumed_at_its_end_logs_nothing_twice(tmp_path, sft_run):
    run_dir = copy_run(sft_run, tmp_path)
    before = events(run_dir)
    done = cli("sft", run_dir, "trainer.max_steps=2", "checkpoint.save_every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert events(run_dir) == before and steps(run_dir) == [1, 2]


# ----------------------------------------------------------------------- the reference


def fake_checkpoint(path: Path, global_step) -> Path:
    path.mkdir(parents=True)
    (path / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                           "global_step": global_step}))
    return path


@pytest.mark.parametrize("case", ["same_folder", "same_folder_other_spelling", "step0_base"])
def test_anchoring_toward_the_base_is_refused(tmp_path, case):
    trained = fake_checkpoint(tmp_path / "sft" / "final", 24)
    base = fake_checkpoint(tmp_path / "sft" / "base", 0)
    converted = fake_checkpoint(tmp_path / "converted", None)
    base_key, reference = {
        "same_folder": (converted, converted),
        "same_folder_other_spelling": (converted, tmp_path / "sft" / ".." / "converted"),
        "step0_base": (None, base),
    }[case]
    overrides = ["method=anchored", f"model.reference_checkpoint={reference}",
                 f"logging.dir={tmp_path / 'run'}"]
    if base_key is not None:
        overrides.append(f"model.base_checkpoint={base_key}")
    with pytest.raises(ConfigError, match="model.reference_checkpoint") as refused:
        load_config(RECIPE, overrides)
    assert "trains nothing" in str(refused.value)
    # A trained reference is accepted, from either kind of base.
    for base_choice in (base, converted):
        load_config(RECIPE, ["method=anchored", f"model.base_checkpoint={base_choice}",
                             f"model.reference_checkpoint={trained}"])


def test_anchoring_toward_the_base_stops_the_cli_before_training(tmp_path, capsys):
    from nemo_anchored.cli.main import main

    base = fake_checkpoint(tmp_path / "base", 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["anchor", "--config", str(RECIPE), f"model.base_checkpoint={base}",
              f"model.reference_checkpoint={base}", f"logging.dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    assert "model.reference_checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
