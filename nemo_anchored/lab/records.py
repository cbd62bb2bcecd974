"""What a lab keeps on disk so that the same command, run again, continues where it stopped.

    OUT/lab.json                    the settings the lab was started with (and its base's files)
    OUT/runs/<training>/scores.json one per finished training: its identity and its scores (or
                                    its failure), written atomically when the training ends

A training with a record is not run again; one without (killed mid-run) starts over in an
emptied run directory. A record is reused only for a training with the same identity, and a lab
directory only with the same settings: anything else is refused, naming what changed, rather
than mixing results of two settings in one results.json.

The identity of a training is its resolved run config without the keys that say where it writes,
and with the method named by the objective the trainer runs (``training_identity``): two
entries of the lab's plan with equal identities are the same training, run once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from nemo_anchored.atomic import write_text
from nemo_anchored.errors import UserError

SETTINGS_RECORD = "lab.json"
RUN_RECORD = "scores.json"
# What and where a run writes about itself (its name, logs, trackers, checkpoints), not what it
# computes: the lab sets these sections alike for every training but for names and paths.
_OUTPUT_SECTIONS = ("name", "logging", "checkpoint")


def training_name(seed: int, name: str) -> str:
    """A training's name (its directory under OUT/runs/): the seed's folder, then the run's name
    in the sweep; ``seed_of_training`` reads the seed back."""
    return f"seed{seed}/{name}"


def seed_of_training(name: str) -> int:
    return int(name.split("/", 1)[0][len("seed"):])


class LabResumeError(RuntimeError, UserError):
    """OUT holds a lab, or a training's record, made with other settings."""


def training_identity(cfg) -> dict:
    """The resolved run config that determines the trained weights (without _OUTPUT_SECTIONS).

    ``method`` is replaced by the class of the objective: the trainer branches on the method only
    through that class (MethodLoss.for_config) and through "anchored" / "kl_sft", which have
    classes of their own. sft and low_sft are both CrossEntropy, so at the same lr, seed and
    data they are one training (low_sft is the SFT objective on a lower lr grid).
    """
    from omegaconf import OmegaConf

    from nemo_anchored.training.methods import MethodLoss

    identity = OmegaConf.to_container(cfg, resolve=True)
    identity["method"] = type(MethodLoss.for_config(cfg)).__name__
    for section in _OUTPUT_SECTIONS:
        del identity[section]
    return identity


def differences(then: dict, now: dict, prefix: str = "") -> List[str]:
    """``key: A then, B now`` for every dotted key whose value differs (or exists on one side)."""
    found = []
    for key in sorted(set(then) | set(now), key=str):
        a, b = then.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a} then, {b} now")
    return found


def _json(value) -> dict:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def check_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in a new lab directory; in one that holds a lab, refuse other ones."""
    path = out / SETTINGS_RECORD
    settings = _json(settings)
    if not path.is_file():
        write_text(path, json.dumps(settings, indent=1) + "\n")
        return
    changed = differences(json.loads(path.read_text()), settings)
    if changed:
        raise LabResumeError(
            f"{out} holds a lab started with other settings ({'; '.join(changed)}): it "
            f"continues only with the settings in {path}. Rerun with those, or use another "
            "--out (or delete that directory to start over)")


def read_run(run_dir: Path, identity: dict) -> Optional[dict]:
    """The record of the finished training in ``run_dir`` (None: not finished), after checking
    that it was made with ``identity``."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    changed = differences(record["identity"], _json(identity))
    if changed:
        raise LabResumeError(
            f"{path} records a training with another config ({'; '.join(changed)}): the "
            "recipe or the code changed since it ran. Restore them, or use another --out")
    return record


def write_run(run_dir: Path, identity: dict, result: dict) -> dict:
    """Record a finished training; ``result``: scores (null for the pretraining) or failure,
    and time_s. Returns the record."""
    record = {"identity": _json(identity), **_json(result)}
    write_text(run_dir / RUN_RECORD, json.dumps(record, indent=1) + "\n")
    return record
