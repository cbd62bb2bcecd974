"""Distributed checkpoints (nemo_anchored.checkpoint.sharded) across layouts, on CPU with gloo.

Two subprocess runs of tests/checkpoint_worker.py, side by side, feed all tests: one torchrun
world of 2 processes (resume at TP=2; resharding TP=2 <-> TP=1, PP=2 and the distributed
optimizer; crash leftovers, checksums and errors) and one unlaunched single process (resume with
adam and with SGD; checksums; the messages for damaged, foreign and incomplete checkpoints and a
full disk).
Each run produces many named checks and each test asserts one topic. Nothing here imports
nemo_anchored or megatron-core: the CPU shims stay out of the pytest process.
"""

from importlib.metadata import version
from pathlib import Path

import pytest

from tests.launch import Worker, assert_topic

pytestmark = pytest.mark.slow  # torchrun

WORKER = Path(__file__).with_name("checkpoint_worker.py")
# megatron-core writes common.pt before 0.19 (later releases keep that state inside the
# torch_dist files); the worker's cases of a damaged common.pt and of a 0.19 checkpoint need it.
WRITES_COMMON_FILE = tuple(int(n) for n in version("megatron-core").split(".")[:2]) < (0, 19)


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    """{number of processes: checks} of both runs, started together: the single process uses
    the core that the torchrun pair leaves idle while its ranks wait on each other."""
    workers = {}
    try:
        for nproc in (2, 1):
            workdir = tmp_path_factory.mktemp("checkpoint")
            workers[nproc] = Worker(WORKER, workdir, "--dir", workdir / "checkpoints",
                                    nproc=nproc)
        return {nproc: worker.checks() for nproc, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.kill()  # one still running after the other failed; no-op once finished


@pytest.fixture(scope="module")
def two_process_checks(checks):
    return checks[2]


@pytest.fixture(scope="module")
def single_process_checks(checks):
    return checks[1]


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
    """Another hidden size, number of layers, ffn hidden size or attention layout: the error
    names the first tensor that differs, both shapes and the dimension; a missing tensor and
    another vocabulary are named too."""
    assert_topic(two_process_checks, "errors", 2 * 6)


def test_damaged_files_are_named_at_load(single_process_checks, two_process_checks):
    """save_checkpoint records every file's size and CRC-32 in the marker (each rank those it
    wrote); a flipped byte in a data file makes load_checkpoint and load_model_weights raise
    naming the file, on every rank, before anything is loaded; the repaired copy and a
    checkpoint from before checksums load."""
    assert_topic(single_process_checks, "integrity", 6)
    assert_topic(two_process_checks, "checksums", 2 * 2)


def test_sgd_resume_is_bitwise_exact(single_process_checks):
    """SGD with momentum: the momentum buffers come back and the resumed steps' losses and
    weights equal the uninterrupted run's bitwise (loading used to fail with a TypeError)."""
    assert_topic(single_process_checks, "sgd", 5)


def test_messages_say_what_is_wrong(single_process_checks):
    """A Hugging Face folder (how to convert it), a .tmp directory (the checkpoint to use
    instead), damaged files of a checkpoint without checksums (named, or called corrupt), a
    checkpoint of megatron-core 0.19 where an older one runs (the version to load it with,
    nothing loaded), and a full disk during a save (no space left on the folder; the previous
    checkpoint stays)."""
    assert_topic(single_process_checks, "messages", 10 if WRITES_COMMON_FILE else 7)


def test_single_process_without_launcher(single_process_checks):
    assert_topic(single_process_checks, "single", 4)
