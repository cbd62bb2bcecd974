"""What a run resumes from, checked before anything is written: the newest usable checkpoint
(unusable ones are named, and a folder with none usable stops the run rather than starting it
over), taken with the same settings it was saved with."""
from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from omegaconf import OmegaConf

from nemo_anchored.checkpoint.format import CheckpointError, read_marker, scan_checkpoints
from nemo_anchored.config import ConfigError

# The settings a resume must share with its checkpoint (which records them), since a change
# would not fail but silently make another run of the rest: the objective (method and its
# settings), the data and its order (the global batch, seed, packing, shuffling, held-out
# fraction, the sequence length and the bad- and over-long-line policies: with "data", the
# training examples themselves), the updates (lr, weight decay, the schedule, which megatron's
# scheduler takes from the checkpoint, not the config), and what the optimizer state was saved
# for (its name, the model's dtype, the distributed optimizer: elsewhere its load fails on
# missing keys, reported as damaged files).
RESUME_SETTINGS = (
    "method", "trainer.global_batch_size", "trainer.seed", "data.valid_fraction",
    "data.packing", "data.shuffle", "data.seq_length", "data.on_error", "data.overlong",
    "optim.name", "optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.decay_style",
    "model.dtype", "parallelism.use_distributed_optimizer",
    "anchor.alpha", "anchor.interpolation", "anchor.mode", "anchor.temperature",
    "anchor.outer_iterations", "anchor.inner_epochs", "anchor.inner_steps",
    "anchor.restart_optimizer", "baselines.kl_lambda", "baselines.stm_threshold")
# The settings only one method reads (compared only for a checkpoint of that method).
_METHOD_OF = {"anchor": "anchored", "baselines.kl_lambda": "kl_sft",
              "baselines.stm_threshold": "stm"}
# Those whose optimizer state cannot load into another's: refused even with
# checkpoint.allow_changed_settings.
_OPTIMIZER_STATE = ("optim.name", "model.dtype", "parallelism.use_distributed_optimizer")
# What starting over does to the run directory (for the messages that offer it).
_START_OVER = ("checkpoint.resume=none (this truncates {metrics} and moves the checkpoints in "
               "checkpoint.dir aside)")


def settings_of(cfg, data: str) -> Dict[str, object]:
    """The RESUME_SETTINGS of a run config, and ``data`` (``data_identity``), as a checkpoint
    records them."""
    return {**{key: OmegaConf.select(cfg, key) for key in RESUME_SETTINGS}, "data": data}


def data_identity(dataset) -> str:
    """The tokenized training examples (an SFTDataset, before any split), in a line: a changed
    file, tokenizer or chat template changes it."""
    crc = 0
    for array in (dataset.offsets, dataset.ids, dataset.assistant):
        crc = zlib.crc32(np.ascontiguousarray(array), crc)
    return f"{len(dataset)} examples, {len(dataset.ids)} tokens, CRC-32 {crc:08x}"


def _compared(key: str, method: str) -> bool:
    owner = _METHOD_OF.get(key, _METHOD_OF.get(key.split(".")[0]))
    return owner is None or owner == method


def resume_point(cfg, run_dir: Path, data: str) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint to resume from (None: start at step 0) and warnings for the log.
    Raises, before anything is written, when the checkpoint folder holds checkpoints but
    none is usable, or when the checkpoint's RESUME_SETTINGS or training data (``data``, as
    ``data_identity`` gives it) differ from this run's."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None, []
    if resume == "auto":
        path, warnings = _latest_usable_checkpoint(cfg, run_dir)
    else:
        path, warnings = Path(resume), []
    if path is not None:
        warnings += _compare_settings(cfg, run_dir, path, data)
    return path, warnings


def set_aside_earlier_checkpoints(root: Path) -> Optional[str]:
    """For a run that starts over (checkpoint.resume=none): moves the ``step_*`` checkpoints of
    an earlier run in ``root`` into ``root/superseded-<UTC time>/``, where no resume looks, and
    says so (None: there were none). Left in place, those of later steps than this run reaches
    before a preemption would be the ones a resume takes, as this run's. Moved, not deleted: a
    save is not ours to destroy. Rank 0 only."""
    earlier = sorted(root.glob("step_*")) if root.is_dir() else []
    if not earlier:
        return None
    aside = root / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    for path in earlier:
        path.rename(aside / path.name)
    return (f"checkpoint.resume=none starts over: the {len(earlier)} checkpoints of an earlier "
            f"run in {root} ({earlier[0].name} to {earlier[-1].name}) are moved to {aside}, so "
            "that no resume takes them for this run's")


def _latest_usable_checkpoint(cfg, run_dir: Path) -> Tuple[Optional[Path], List[str]]:
    root = Path(cfg.checkpoint.dir)
    scan = scan_checkpoints(root)
    reasons = [reason for _, reason in scan.skipped]
    if scan.latest is None and reasons:
        raise CheckpointError(
            f"no usable checkpoint to resume from in {root}: {'; '.join(reasons)}. Nothing "
            f"was written or changed. To start over from step 0, run again with "
            f"{_START_OVER.format(metrics=run_dir / 'metrics.jsonl')}; to resume from a "
            f"checkpoint elsewhere, checkpoint.resume=PATH")
    return scan.latest, [f"warning: resume skips an unusable checkpoint: {reason}"
                         for reason in reasons]


def _compare_settings(cfg, run_dir: Path, path: Path, data: str) -> List[str]:
    """Refuses (ConfigError) a resume whose RESUME_SETTINGS or data differ from the
    checkpoint's, unless checkpoint.allow_changed_settings; returns the warnings for the log.
    A setting the checkpoint does not record (an older save) is not compared."""
    saved = read_marker(path).get("state", {}).get("settings")
    if saved is None:
        return [f"warning: checkpoint {path} does not record {', '.join(RESUME_SETTINGS)} "
                "(an older save): the resume cannot check that they are unchanged"]
    now, method = settings_of(cfg, data), saved.get("method", cfg.method)
    changed = [f"{key}={saved[key]} in the checkpoint, {now[key]} now"
               for key in (*RESUME_SETTINGS, "data")
               if key in saved and _compared(key, method) and saved[key] != now[key]]
    if not changed:
        return []
    what = f"checkpoint {path} was saved with other settings: {'; '.join(changed)}"
    start_over = _START_OVER.format(metrics=run_dir / "metrics.jsonl")
    if any(key in saved and saved[key] != now[key] for key in _OPTIMIZER_STATE):
        raise ConfigError(f"{what}. Its optimizer state cannot be loaded with another "
                          f"{', '.join(_OPTIMIZER_STATE)}: restore them, or start over from "
                          f"step 0 with {start_over}")
    if cfg.checkpoint.allow_changed_settings:
        return [f"warning: {what}; resuming anyway (checkpoint.allow_changed_settings=true): "
                "the data order or the updates from here on differ from the saved run's"]
    raise ConfigError(
        f"{what}. Resuming would change the run silently (the method and its settings set the "
        "objective; the data file, tokenizer, global batch size, seed, held-out fraction, "
        "packing and shuffling the examples and their order; the optimizer settings the "
        "updates). Restore them, resume anyway with checkpoint.allow_changed_settings=true, "
        f"or start over from step 0 with {start_over}")
