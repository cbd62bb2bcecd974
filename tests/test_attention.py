"""Core attention and activation recomputation: SDPA against megatron's own attention, every
recomputation granularity against none, and bf16 pipeline parallelism with untied embeddings
against PP=1; on CPU with gloo.

One torchrun world of 2 processes (tests/layers_worker.py) feeds the slow tests: each asserts
one topic of its named checks. The configuration checks run in this process (no megatron).
"""
from pathlib import Path

import pytest

from nemo_anchored.config import ConfigError, load_config
from tests.launch import assert_topic, worker_checks
from tests.training_worker import RECIPE

WORKER = Path(__file__).with_name("layers_worker.py")
DATA = [f"data.train_path={RECIPE.parent / 'data' / 'tiny_sft.jsonl'}"]
# Per comparison and rank at TP=2: the summed loss, the logits of 2 micro-batches, 1 presence
# check and the 26 policy gradients of the 4-layer model.
PER_COMPARISON = 1 + 2 + 1 + 26


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return worker_checks(WORKER, tmp_path_factory.mktemp("layers"), nproc=2)


@pytest.mark.slow
def test_sdpa_matches_megatron_attention(checks):
    """TP=2, grouped-query heads, fp32: logits, summed losses and every gradient within 1e-5
    relative of megatron's DotProductAttention, for the sft and the anchored loss, causal and
    packed (block-diagonal causal mask, restarting positions); the same state-dict and
    distributed-checkpoint keys; the same greedy tokens through megatron's KV cache."""
    assert_topic(checks, "sdpa", 2 * (4 * PER_COMPARISON + 3))


@pytest.mark.slow
def test_recomputation_matches_none_with_dropout_on(checks):
    """TP=2, hidden and attention dropout 0.1: selective, full uniform and full block
    recomputation give the losses and gradients of no recomputation (SDPA, anchored, packed),
    and selective also with megatron's attention (sft, causal: its mask is rebuilt), through
    the schedules and through a plain ``loss.backward()`` (26 gradients); another seed changes
    the loss; on the CPU, SDPA's dropout equals megatron's (same stream, same draws)."""
    assert_topic(checks, "recompute", 2 * (5 * PER_COMPARISON + 2 + 26))


@pytest.mark.slow
def test_bf16_pipeline_parallel_untied_matches_pp1(checks):
    """bf16, untied output layer: PP=2 through 1F1B gives PP=1's last-stage logits and losses
    and each stage's gradients (sft and anchored, three resident models)."""
    # Stage 0: presence + embedding + 2 layers x 6; stage 1: loss, 2 logits, presence,
    # 2 layers x 6, final norm, output layer; per method, plus one untied check per rank.
    assert_topic(checks, "bf16_pp2", 2 * ((1 + 13) + (1 + 2 + 1 + 14)) + 2)


@pytest.mark.parametrize("overrides,key", [
    (["model.attention=flash"], "model.attention"),
    (["model.recompute=layers"], "model.recompute"),
    (["model.recompute=full", "model.recompute_method=every"], "model.recompute_method"),
    # tiny_cpu has 2 layers: 3 exceed a stage, and at PP=2 a stage holds 1
    (["model.recompute=full", "model.recompute_num_layers=3"], "model.recompute_num_layers"),
    (["model.recompute=full", "model.recompute_num_layers=2",
      "parallelism.pipeline_model_parallel_size=2"], "model.recompute_num_layers"),
    (["model.attention=sdpa", "parallelism.sequence_parallel=true",
      "parallelism.tensor_model_parallel_size=2"], "parallelism.sequence_parallel"),
])
def test_attention_and_recompute_settings_are_checked_by_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(RECIPE, [*DATA, *overrides], world_size=2)


def test_uniform_recomputation_needs_whole_chunks():
    cfg = load_config(RECIPE, [*DATA, "model.num_layers=4", "model.recompute=full",
                               "model.recompute_method=block", "model.recompute_num_layers=3"])
    assert (cfg.model.recompute_method, cfg.model.recompute_num_layers) == ("block", 3)
    with pytest.raises(ConfigError, match="^model.recompute_num_layers: 3 must divide the 4"):
        load_config(RECIPE, [*DATA, "model.num_layers=4", "model.recompute=full",
                             "model.recompute_num_layers=3"])
