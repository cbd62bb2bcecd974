"""Validation and the experiment trackers: the held-out split, the config checks, and (one
process launch, several tiny runs) validation metrics in metrics.jsonl equal to the training
loss of the same weights on the same examples, training untouched by validation, and the same
numbers in TensorBoard, W&B (offline) and MLflow (a local folder)."""
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from nemo_anchored.config import ConfigError, load_config
from nemo_anchored.data import build_tokenizer, load_sft_dataset
from nemo_anchored.training.trackers import TrackerError, open_trackers
from nemo_anchored.training.validation import hold_out
from tests.launch import REPO, run_script
from tests.training_worker import RECIPE

TRAIN = RECIPE.parent / "data" / "tiny_sft.jsonl"
WORKER = REPO / "tests" / "training_worker.py"
# The training file by absolute path, whatever the recipe's relative one resolves against.
DATA = [f"data.train_path={TRAIN}"]


def tiny_dataset():
    return load_sft_dataset(TRAIN, build_tokenizer("byte"), 48)


def test_held_out_split_is_disjoint_complete_and_drawn_by_the_seed():
    dataset = tiny_dataset()
    train, held = hold_out(dataset, 0.25, seed=1234)
    assert (len(train), len(held)) == (72, 24)
    assert set(train.rows) | set(held.rows) == set(range(96))
    assert not set(train.rows) & set(held.rows)
    again_train, again_held = hold_out(dataset, 0.25, seed=1234)
    assert np.array_equal(again_held.rows, held.rows)
    assert not np.array_equal(hold_out(dataset, 0.25, seed=1235)[1].rows, held.rows)
    # A subset's batch is the underlying examples', numbered within the subset.
    batch, underlying = held.batch([0, 5]), dataset.batch(held.rows[[0, 5]])
    for key in ("tokens", "labels", "loss_mask"):
        assert batch[key].equal(underlying[key])
    assert batch["index"].tolist() == [0, 5]


def test_held_out_fraction_leaving_a_part_empty_is_refused():
    with pytest.raises(ValueError, match="data.valid_fraction: 0.001 of the 96 examples"):
        hold_out(tiny_dataset(), 0.001, seed=1)


@pytest.mark.parametrize("overrides,key", [
    ([f"data.valid_path={TRAIN}", "data.valid_fraction=0.1"], "data.valid_path/valid_fraction"),
    (["data.valid_fraction=1.0"], "data.valid_fraction"),
    (["trainer.eval_interval=5"], "trainer.eval_interval"),
    (["data.valid_path=/nonexistent.jsonl"], "data.valid_path"),
    (["logging.wandb.mode=cloud"], "logging.wandb.mode"),
])
def test_validation_and_tracker_settings_are_checked_by_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(RECIPE, [*DATA, *overrides])


def test_a_missing_tracker_package_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what import sees when it is absent
    cfg = load_config(RECIPE, [*DATA, f"logging.dir={tmp_path}", "logging.wandb.enabled=true"])
    with pytest.raises(TrackerError, match="logging.wandb.enabled=true needs the wandb package.*"
                                           "pip install wandb"):
        open_trackers(cfg)


# ------------------------------------------------------------------------------- runs


def wandb_records(run_dir: Path):
    """(history rows, config) of the W&B offline run in ``run_dir``, read from its transaction
    log: LevelDB-log framing (32 KiB blocks of records with a 7-byte header) of W&B protobuf
    records, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    raw, pos, pending, history, config = path.read_bytes(), 7, b"", [], {}
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append({item.nested_key[0]: json.loads(item.value_json)
                                for item in record.history.item})
            elif record.WhichOneof("record_type") == "run":
                config = {item.key: json.loads(item.value_json)
                          for item in record.run.config.update}
    return history, config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    common = [*DATA, "logging.progress=false", "logging.tensorboard=false",
              "checkpoint.resume=none", f"data.cache_dir={out / 'cache'}"]
    # A small file in one global batch, validated on itself: the validation after step s
    # sees the weights and examples that step s + 1 trains on.
    small = out / "small.jsonl"
    small.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:16]))
    whole = [f"data.train_path={small}", "trainer.global_batch_size=16",
             "trainer.micro_batch_size=8", f"data.valid_path={small}", "trainer.eval_interval=1"]
    sft = out / "sft_whole"

    def run(name, *overrides):
        return {"name": name, "overrides": [*common, *overrides, f"logging.dir={out / name}"]}

    trackers = ["logging.tensorboard=true", "logging.wandb.enabled=true",
                "logging.mlflow.enabled=true"]
    dropout = ["model.hidden_dropout=0.2", "trainer.max_steps=4", "trainer.epochs=1"]
    spec = {"out": str(out), "runs": [
        run("sft_whole", "method=sft", "trainer.max_steps=3", *whole),
        run("anchored_whole", "method=anchored", "anchor.outer_iterations=2",
            "anchor.inner_steps=2", f"model.base_checkpoint={sft / 'base'}",
            f"model.reference_checkpoint={sft / 'final'}", *whole, *trackers),
        run("dropout_validated", *dropout, f"data.valid_path={small}", "trainer.eval_interval=1"),
        run("dropout_plain", *dropout),
        run("held_out", "trainer.epochs=1", "data.valid_fraction=0.25",
            "trainer.eval_interval=2"),
    ]}
    path = out / "spec.json"
    path.write_text(json.dumps(spec))
    run_script(WORKER, path)
    return {r["name"]: {**json.loads((out / f"{r['name']}.json").read_text()),
                        "dir": out / r["name"]} for r in spec["runs"]}


def steps(run):
    return {m["step"]: m for m in run["metrics"] if "event" not in m}


def validations(run):
    return {m["step"]: m for m in run["metrics"] if m.get("event") == "validation"}


@pytest.mark.slow
def test_validation_equals_the_training_loss_of_the_same_weights_and_examples(runs):
    train, valid = steps(runs["sft_whole"]), validations(runs["sft_whole"])
    assert sorted(valid) == [1, 2, 3]
    for s in (1, 2):
        assert math.isclose(valid[s]["valid/loss"], train[s + 1]["loss"], rel_tol=1e-6)
        assert math.isclose(valid[s]["valid/ce"], train[s + 1]["ce"], rel_tol=1e-6)
        assert valid[s]["valid/tokens"] == train[s + 1]["valid_tokens"]
    # Anchored: the same within an outer iteration (steps 1-2, 3-4: the snapshot is refreshed
    # between them), the anchored KL, and the KL to the reference from the diagnostics.
    train, valid = steps(runs["anchored_whole"]), validations(runs["anchored_whole"])
    assert sorted(valid) == [1, 2, 3, 4]
    for s in (1, 3):
        for key in ("anchored_kl", "kl_policy_ref", "anchor_step_kl", "entropy"):
            assert math.isclose(valid[s][f"valid/{key}"], train[s + 1][key], rel_tol=1e-5), key
        assert valid[s]["valid/loss"] == valid[s]["valid/anchored_kl"]
        assert valid[s]["valid/tokens_over_bound"] == 0


@pytest.mark.slow
def test_validation_leaves_training_exactly_as_without_it(runs):
    # With dropout on, a validation pass that drew random numbers or moved the data order
    # would change every later loss.
    validated, plain = steps(runs["dropout_validated"]), steps(runs["dropout_plain"])
    assert sorted(validations(runs["dropout_validated"])) == [1, 2, 3, 4]
    assert [m["loss"] for m in validated.values()] == [m["loss"] for m in plain.values()]
    assert [t["policy"] for t in runs["dropout_validated"]["trace"]] == \
        [t["policy"] for t in runs["dropout_plain"]["trace"]]


@pytest.mark.slow
def test_a_held_out_fraction_is_validated_on_and_never_trained_on(runs):
    run = runs["held_out"]
    # One epoch over the 72 training examples in global batches of 8, not over all 96.
    assert sorted(steps(run)) == list(range(1, 10))
    valid = validations(run)
    assert sorted(valid) == [2, 4, 6, 8, 9]  # every 2 steps and after the last
    _, held = hold_out(tiny_dataset(), 0.25, seed=1234)
    assert {m["valid/tokens"] for m in valid.values()} == {int(held.loss_mask.sum())}


@pytest.mark.slow
def test_validation_reaches_tensorboard_and_the_trackers_with_the_config(runs, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the tracker does for file: URIs
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = runs["anchored_whole"]["dir"]
    expected = {s: m["valid/kl_policy_ref"] for s, m in validations(runs["anchored_whole"]).items()}

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("valid/kl_policy_ref")} == \
        pytest.approx(expected, rel=1e-6)

    history, config = wandb_records(run_dir)
    logged = {row["_step"]: row["valid/kl_policy_ref"] for row in history
              if "valid/kl_policy_ref" in row}
    assert logged == pytest.approx(expected, rel=1e-12)
    assert config["anchor"]["alpha"] == 0.5

    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("nemo-anchored").experiment_id])
    assert {m.step: m.value for m in
            client.get_metric_history(found.info.run_id, "valid/kl_policy_ref")} == \
        pytest.approx(expected, rel=1e-12)
    assert found.data.params["anchor.alpha"] == "0.5"
    assert found.data.params["trainer.eval_interval"] == "1"


STM_SCRIPT = r"""
import json, sys
import torch
from nemo_anchored.config import load_config
from nemo_anchored.data import build_tokenizer, load_sft_dataset
from nemo_anchored.parallel.distributed import model_parallel
from nemo_anchored.training.validation import Validation

path = sys.argv[1]
cfg = load_config("recipes/tiny_cpu.yaml", ["method=stm", "trainer.micro_batch_size=2",
                                            f"data.valid_path={path}"], check_paths=False)
dataset = load_sft_dataset(path, build_tokenizer("byte"), cfg.data.seq_length)
last = len(dataset) - 1

def forward_only(batches, loss_fn):
    # Base logits certain of every label (perplexity 1) but on the last example, uniform there
    # (perplexity 259): stm keeps the response tokens of all examples but the last.
    outputs = []
    for batch in batches:
        logits = torch.zeros(*batch["labels"].shape, cfg.model.vocab_size)
        labels = batch["labels"][..., None]
        sure = (batch["index"] != last)[:, None, None].expand_as(labels)
        logits.scatter_(2, labels, torch.where(sure, 30.0, 0.0))
        outputs.append(loss_fn(logits, None, None, batch)[2])
    return outputs

with model_parallel(1, 1, seed=0):
    validation = Validation(cfg, dataset, total_steps=1, dp_rank=0, dp_size=1,
                            forward_only=forward_only, reduce_sums=None, device="cpu")
response = dataset.loss_mask > 0
kept = validation.loss.keep & response
print(json.dumps({"kept": kept.sum(1).tolist(), "response": response.sum(1).tolist(),
                  "summary": validation.summary}))
"""


def test_stm_filter_of_a_validation_set_ignores_the_padding_rows(tmp_path):
    # 3 examples in micro-batches of 2: the second is padded with a copy of the last example
    # whose loss mask is 0. Its cross-entropy of 0 must not stand for the last example's.
    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"answer {i}"}) + "\n"
                            for i in range(3)))
    script = tmp_path / "stm_validation.py"
    script.write_text(STM_SCRIPT)
    out = json.loads(run_script(script, data).stdout.strip().splitlines()[-1])
    assert out["response"] == [9, 9, 9]
    assert out["kept"] == [9, 9, 0]
    assert "stm keeps 18 of 27 response tokens (66.7%)" in out["summary"]
