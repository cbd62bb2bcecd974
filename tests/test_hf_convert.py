"""Hugging Face <-> megatron-core conversion (nemo_anchored.models.hf_import, hf_export), against
transformers as the independent reference.

One torchrun run of tests/hf_convert_worker.py (2 processes) feeds all tests: its rank 0 builds
tiny random Llama / Qwen2 models with transformers and loads SmolLM2-135M-Instruct from its GGUF
file, converts each with `nemo-anchored convert hf-to-mcore` (each conversion starts its own
shard processes: TP=2, PP=2, TP=1, TP=1), exports each back with `convert mcore-to-hf` and
feeds bad input; then both ranks compare megatron's logits at TP=1 and TP=2 with transformers'.
Only the recipe schema (nemo_anchored.config) is imported here: megatron-core and the CPU shims
stay out of the pytest process.
"""

from pathlib import Path

import pytest

from tests.launch import assert_topic

pytestmark = pytest.mark.slow  # torchrun, conversions and transformers models


@pytest.fixture(scope="module")
def checks(hf_conversions):
    return hf_conversions[1]  # the run is shared with tests/test_exports.py (conftest.py)


def test_logits_match_transformers_at_tp1_and_tp2(checks):
    """The three tiny models (GQA + tied; untied + llama3 RoPE scaling + padded vocabulary;
    Qwen2 with QKV bias), converted at TP=2, PP=2 and TP=1, loaded at TP=1 and TP=2 (vocab
    shards gathered): fp32 logits within 1e-4 of transformers'."""
    # 3 models x 2 layouts x 2 ranks.
    assert_topic(checks, "logits", 3 * 2 * 2)
    assert_topic(checks, "rope", 1)  # the RoPE scaling visibly changes those logits


def test_smollm2_gguf_converts_and_matches_transformers(checks):
    """The real SmolLM2-135M-Instruct (GGUF, dequantized by transformers): on three chat-template
    prompts, max |logit difference| <= 2e-5 of the largest logit (observed ~1.5e-6, i.e. 6e-5
    absolute on logits up to ~40: fp32 summation-order differences) and identical greedy
    tokens."""
    assert_topic(checks, "smollm2", 2 * 3 * 2)


def test_round_trip_reproduces_every_tensor_and_the_config(checks):
    """HF -> mcore -> HF: the same tensor names, every tensor torch.equal, config.json equal,
    tokenizer and generation config exported; a small --max-shard-size gives several shards and
    an index; SmolLM2's export loads in transformers with the GGUF model's weights."""
    assert_topic(checks, "roundtrip", 3 * 5 + 3 + 1)


def test_output_directory_is_a_base_checkpoint_with_tokenizer_and_recipe_keys(checks):
    """Each conversion exits 0 and leaves a complete checkpoint, hf/config.json, the tokenizer
    (same vocabulary and chat template) and a model.yaml that matches the Hugging Face config."""
    assert_topic(checks, "layout", 4 * 4)


def test_bad_input_raises_clear_errors(checks):
    """Unsupported architecture, yarn / non-Llama-3.1 RoPE scaling, a missing tensor, a tensor
    whose shape the config contradicts, an unused tensor, a --tp that does not divide the query
    groups, an existing --out; on export a checkpoint whose shapes, architecture or vocabulary
    differ from the base config. Each message names what is wrong and where."""
    assert_topic(checks, "errors", 11)


def test_conversion_dying_half_way_leaves_nothing_that_loads(checks):
    """A NaN in the last layer makes pipeline stage 1 fail while stage 0 waits in the collective
    save: the error names the rank and tensor, and neither DIR nor any staging leftover remains."""
    assert_topic(checks, "atomic", 2)


def test_model_yaml_keys_validate_as_a_recipe(tmp_path):
    """The RoPE-scaling fields are part of the recipe schema and validated."""
    from nemo_anchored.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
    cfg = load_config(recipe, ["model.rope_scaling=true", "model.rope_scaling_factor=32.0"],
                      check_paths=False)
    assert cfg.model.rope_scaling is True and cfg.model.rope_scaling_factor == 32.0
    with pytest.raises(ConfigError, match="model.rope_scaling_factor"):
        load_config(recipe, ["model.rope_scaling=true", "model.rope_scaling_factor=0.5"],
                    check_paths=False)
