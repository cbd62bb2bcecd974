"""Distributed checkpoints (nemo_anchored.training.checkpoint) across layouts, on CPU with gloo.

Two subprocess runs of tests/checkpoint_worker.py feed all tests: one torchrun world of 2
processes (resume at TP=2; resharding TP=2 <-> TP=1, PP=2 and the distributed optimizer; crash
leftovers and errors) and one unlaunched single process. Each run produces many named checks
and each test asserts one topic. Nothing here imports nemo_anchored or megatron-core: the CPU
shims stay out of the pytest process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("checkpoint_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_worker(workdir: Path, launcher: list) -> list:
    out = workdir / "checks.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # One intra-op thread per process: on 2 cores, OpenMP oversubscription makes these tiny
    # models ~100x slower.
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    proc = subprocess.run(
        [sys.executable, *launcher, str(WORKER), "--out", str(out),
         "--dir", str(workdir / "checkpoints")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_process_checks(tmp_path_factory):
    launcher = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return _run_worker(tmp_path_factory.mktemp("checkpoint"), launcher)


@pytest.fixture(scope="module")
def single_process_checks(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("checkpoint"), [])


def _assert_topic(checks, topic, min_count):
    selected = [c for c in checks if c["topic"] == topic]
    assert len(selected) >= min_count, f"only {len(selected)} '{topic}' checks ran"
    failed = [
        f"rank {c['rank']}: {c['name']}" + ("" if c["value"] is None
                                            else f" = {c['value']:.3g} > {c['limit']:.3g}")
        for c in selected if not c["ok"]
    ]
    assert not failed, "\n".join(failed)


def test_resume_is_bitwise_exact(two_process_checks):
    """At TP=2 with dropout: save after 2 adam steps, rebuild from another seed, load; the
    next 2 steps' losses and the final weights equal the uninterrupted run's bitwise. Policy,
    snapshot, adam moments, lr schedule, each rank's trainer state and every RNG stream are
    restored; re-seeding instead of restoring the RNG changes the losses."""
    _assert_topic(two_process_checks, "resume", 2 * 13)


def test_weights_reshard_across_layouts(two_process_checks):
    """TP=2 -> TP=1 and TP=1 -> TP=2 (vocabulary padded to 1280 vs 1152): unsharded weights
    equal exactly, logits within 1e-5; load_checkpoint at another layout reshards adam's moments
    too; PP=2 stages load and save their own layers."""
    _assert_topic(two_process_checks, "reshard", 2 * 12)


def test_distributed_optimizer(two_process_checks):
    """megatron's distributed optimizer (state sharded over DP=2): bitwise resume, and its
    checkpoint loads at TP=2, DP=1."""
    _assert_topic(two_process_checks, "dist_opt", 2 * 8)


def test_incomplete_checkpoints_never_load(two_process_checks):
    """Leftovers of crashed saves (.tmp without or with marker, a directory without marker,
    another format version) are skipped by latest_checkpoint and raise on load naming the
    path; re-saving over a checkpoint swaps it in whole."""
    _assert_topic(two_process_checks, "atomic", 2 * 12)


def test_architecture_mismatch_names_the_checkpoint(two_process_checks):
    _assert_topic(two_process_checks, "errors", 2 * 4)


def test_single_process_without_launcher(single_process_checks):
    _assert_topic(single_process_checks, "single", 4)
