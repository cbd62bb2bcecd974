"""The megatron-core engine layer across parallel layouts, on CPU with gloo.

Two subprocess runs of tests/engine_parallel_worker.py feed all tests: one torchrun world of 2
processes (TP=1 baseline, TP=2, PP=2 with 1F1B) and one unlaunched single process. Process start
dominates the cost (~10 s each on 2 cores), so each run produces many named checks and each test
asserts one topic. Nothing here imports nemo_anchored or megatron-core: the CPU shims stay out
of the pytest process, and a missing megatron-core fails the tests (with the worker's traceback)
instead of skipping them.
"""

from pathlib import Path

import pytest

from tests.launch import assert_topic, worker_checks

pytestmark = pytest.mark.slow  # torchrun

WORKER = Path(__file__).with_name("engine_parallel_worker.py")


@pytest.fixture(scope="module")
def two_process_checks(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("engine")
    return worker_checks(WORKER, workdir, nproc=2)


@pytest.fixture(scope="module")
def single_process_checks(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("engine")
    return worker_checks(WORKER, workdir, nproc=1)


def test_tensor_parallel_2_matches_tp1(two_process_checks):
    """Logits of policy, reference and snapshot (full vocab gathered from the shards), the loss
    of each micro-batch and every policy gradient (unsharded) equal TP=1 within 1e-5 fp32; the
    padded vocab columns (1100 -> 1280) are -inf on the rank holding them."""
    # Per rank: 3 logits, 2 loss, 1 presence, 2 per policy parameter (30), 1 padding.
    assert_topic(two_process_checks, "tp2", 2 * (3 + 2 + 1 + 2 * 30 + 1))


def test_pipeline_parallel_2_1f1b_matches_pp1(two_process_checks):
    """Through megatron's 1F1B schedule with 4 micro-batches, the last stage sees the same logits
    of all three models and the same losses as PP=1, and each stage's policy gradients (the tied
    embedding reduced across stages) equal PP=1's."""
    # Stage 0: 1 presence, 2 per parameter (15), 1 shapes. Stage 1: 3 logits, 2 loss,
    # 1 presence, 2 per parameter (16, with its copy of the tied embedding), 1 shapes.
    assert_topic(two_process_checks, "pp2", (1 + 2 * 15 + 1) + (3 + 2 + 1 + 2 * 16 + 1))


def test_frozen_models_get_no_gradients(two_process_checks):
    assert_topic(two_process_checks, "frozen", 12)


def test_snapshot_refresh_and_reference_loading(two_process_checks):
    assert_topic(two_process_checks, "snapshot", 3)


def test_checkpoint_state_is_the_policy_only(two_process_checks):
    assert_topic(two_process_checks, "checkpoint", 2)


def test_single_process_without_launcher(single_process_checks):
    """A world of one process (no torchrun) with the two-model stack: logits, loss, gradients,
    bfloat16 models, megatron's optimizer (clipped step) touching the policy only, and a clean
    teardown that allows a second initialisation in the same process."""
    assert_topic(single_process_checks, "single", 17)
    assert_topic(single_process_checks, "frozen", 4)
