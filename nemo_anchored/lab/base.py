"""The lab's committed p_base: small pretrained checkpoints, so the lab skips pretraining, and
every machine that runs a shard of a lab (`--seed-index`) starts from the same weights.

    assets/lab_base       the quick lab's and `make demo`'s
    assets/lab_base_full  the full lab's

Each folder's ``base.json`` records the settings it was pretrained with (the fingerprint: the
resolved model and batch settings of recipes/lab_tiny.yaml and the lab's data and pretraining
settings), a SHA-256 per checkpoint file, and the one command that regenerates it, e.g.

    nemo-anchored lab --pretrain-only --full --out assets/lab_base_full

The lab uses a base only when its fingerprint equals the current settings', and refuses it when a
file's checksum does not match (a corrupted or hand-edited checkpoint must not pass as p_base).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from nemo_anchored.atomic import copy_tree, write_text
from nemo_anchored.errors import UserError

_PRETRAIN_KEYS = ("general_train", "general_eval", "data_seed", "pretrain_epochs", "pretrain_lr",
                  "pretrain_warmup_steps", "model_overrides")


class CommittedBaseError(RuntimeError, UserError):
    """The committed base's files do not match its recorded checksums."""


def pretrain_fingerprint(recipe: Path, settings) -> dict:
    """Everything that determines the pretrained base."""
    from omegaconf import OmegaConf

    from nemo_anchored.config import ModelConfig, load_config

    cfg = load_config(recipe, list(settings.model_overrides), check_paths=False)
    # Model keys at their schema default are left out, so a new schema field (added with a
    # default that keeps old behaviour) does not invalidate the committed base.
    defaults = OmegaConf.structured(ModelConfig)
    model = {key: value for key, value in OmegaConf.to_container(cfg.model, resolve=True).items()
             if key not in ("base_checkpoint", "reference_checkpoint")
             and (OmegaConf.is_missing(defaults, key) or value != defaults[key])}
    lab = dataclasses.asdict(settings)
    return {"model": model, "batch": {"global": cfg.trainer.global_batch_size,
                                      "micro": cfg.trainer.micro_batch_size},
            "seq_length": cfg.data.seq_length, "optim": cfg.optim.name,
            "lab": {k: list(lab[k]) if k == "model_overrides" else lab[k]
                    for k in _PRETRAIN_KEYS}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(checkpoint: Path) -> dict:
    """SHA-256 of every file directly in a checkpoint directory, by name."""
    return {p.name: _sha256(p) for p in sorted(Path(checkpoint).iterdir()) if p.is_file()}


def weight_digests(digests: dict) -> dict:
    """The part of ``file_digests`` that identifies the weights: two saves of the same weights
    differ in their bookkeeping (torch's .metadata holds a per-save storage id, complete.json
    the time of writing), not in the tensor files or megatron's common state."""
    return {name: d for name, d in digests.items() if name not in (".metadata", "complete.json")}


def verified_committed_base(folder: Path, fingerprint: dict) -> Optional[Path]:
    """The committed checkpoint when it was made with ``fingerprint``'s settings (None when not);
    CommittedBaseError when a file is missing or its checksum differs."""
    record = json.loads((folder / "base.json").read_text())
    if record["fingerprint"] != json.loads(json.dumps(fingerprint)):
        return None
    checkpoint = folder / "checkpoint"
    found = {p.name for p in checkpoint.iterdir()} if checkpoint.is_dir() else set()
    if found != set(record["sha256"]):
        raise CommittedBaseError(f"{checkpoint}: files {sorted(found)} differ from the recorded "
                                 f"{sorted(record['sha256'])}; regenerate with "
                                 f"`{record['command']}`")
    for name, digest in record["sha256"].items():
        if _sha256(checkpoint / name) != digest:
            raise CommittedBaseError(f"{checkpoint / name}: SHA-256 differs from base.json; "
                                     f"regenerate with `{record['command']}`")
    return checkpoint


def write_committed_base(folder: Path, final_checkpoint: Path, fingerprint: dict,
                         scores: dict, command: str) -> Path:
    """Copy a pretrained final checkpoint to ``folder``/checkpoint with base.json, which names
    ``command``, the one that regenerates it (the old base.json is removed first and the new one
    written last: an interrupted write leaves no base.json that vouches for the checkpoint)."""
    (folder / "base.json").unlink(missing_ok=True)
    checkpoint = copy_tree(final_checkpoint, folder / "checkpoint")
    record = {"command": command, "fingerprint": fingerprint, "base_scores": scores,
              "sha256": file_digests(checkpoint)}
    write_text(folder / "base.json", json.dumps(record, indent=1) + "\n")
    return checkpoint
