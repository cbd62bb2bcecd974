"""Distributed checkpoints (nemo_anchored.checkpoint.sharded) across layouts, on CPU with gloo.

Two subprocess runs of tests/checkpoint_worker.py feed all tests: one torchrun world of 2
processes (resume at TP=2; resharding TP=2 <-> TP=1, PP=2 and the distributed optimizer; crash
leftovers and errors) and one unlaunched single process. Each run produces many named checks
and each test asserts one topic. Nothing here imports nemo_anchored or megatron-core: the CPU
shims stay out of the pytest process.
"""

from pathlib import Path

import pytest

from tests.launch import assert_topic, worker_checks

pytestmark = pytest.mark.slow  # torchrun

WORKER = Path(__file__).with_name("checkpoint_worker.py")


@pytest.fixture(scope="module")
def two_process_checks(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("checkpoint")
    return worker_checks(WORKER, workdir, "--dir", workdir / "checkpoints", nproc=2)


@pytest.fixture(scope="module")
def single_process_checks(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("checkpoint")
    return worker_checks(WORKER, workdir, "--dir", workdir / "checkpoints", nproc=1)


def test_resume_is_bitwise_exact(two_process_checks):
    """At TP=2 with dropout: save after 2 adam steps, rebuild from another seed, load; the
    next 2 steps' losses and the final weights equal the uninterrupted run's bitwise. Policy,
    snapshot, adam moments, lr schedule, each rank's trainer state and every RNG stream are
    restored; re-seeding instead of restoring the RNG changes the losses."""
    assert_topic(two_process_checks, "resume", 2 * 13)


def test_weights_reshard_across_layouts(two_process_checks):
    """TP=2 -> TP=1 and TP=1 -> TP=2 (the same padded vocabulary, 1152): unsharded weights
    equal exactly, logits within 1e-5; load_checkpoint at another layout reshards adam's moments
    too; PP=2 stages load and save their own layers."""
    assert_topic(two_process_checks, "reshard", 2 * 12)


def test_distributed_optimizer(two_process_checks):
    """megatron's distributed optimizer (state sharded over DP=2): bitwise resume, and its
    checkpoint loads at TP=2, DP=1."""
    assert_topic(two_process_checks, "dist_opt", 2 * 8)


def test_incomplete_checkpoints_never_load(two_process_checks):
    """Leftovers of crashed saves (.tmp without or with marker, a directory without marker,
    another format version) are skipped by latest_checkpoint and raise on load naming the
    path; re-saving over a checkpoint swaps it in whole."""
    assert_topic(two_process_checks, "atomic", 2 * 12)


def test_architecture_mismatch_names_the_checkpoint(two_process_checks):
    assert_topic(two_process_checks, "errors", 2 * 4)


def test_single_process_without_launcher(single_process_checks):
    assert_topic(single_process_checks, "single", 4)
