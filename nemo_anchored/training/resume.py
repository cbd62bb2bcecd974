"""What a run resumes from, checked before anything is written: the newest usable checkpoint
(unusable ones are named, and a folder with none usable stops the run rather than starting it
over), taken with the same settings it was saved with."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from nemo_anchored.checkpoint.format import CheckpointError, read_marker, scan_checkpoints
from nemo_anchored.config import ConfigError

# The settings a resume must share with its checkpoint (which records them): a changed global
# batch, seed or packing reorders the data, a changed held-out fraction changes the training
# examples, a changed lr changes the updates, and none of them would fail.
RESUME_SETTINGS = ("trainer.global_batch_size", "trainer.seed", "data.valid_fraction",
                   "data.packing", "optim.lr")


def settings_of(cfg) -> Dict[str, object]:
    """The RESUME_SETTINGS of a run config, as a checkpoint records them."""
    return {key: OmegaConf.select(cfg, key) for key in RESUME_SETTINGS}


def resume_point(cfg, run_dir: Path) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint to resume from (None: start at step 0) and warnings for the log.
    Raises, before anything is written, when the checkpoint folder holds checkpoints but
    none is usable, or when the checkpoint's RESUME_SETTINGS differ from this run's."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None, []
    if resume == "auto":
        path, warnings = _latest_usable_checkpoint(cfg, run_dir)
    else:
        path, warnings = Path(resume), []
    if path is not None:
        warnings += _compare_settings(cfg, run_dir, path)
    return path, warnings


def _latest_usable_checkpoint(cfg, run_dir: Path) -> Tuple[Optional[Path], List[str]]:
    root = Path(cfg.checkpoint.dir)
    scan = scan_checkpoints(root)
    reasons = [reason for _, reason in scan.skipped]
    if scan.latest is None and reasons:
        raise CheckpointError(
            f"no usable checkpoint to resume from in {root}: {'; '.join(reasons)}. Nothing "
            f"was written or changed. To start over from step 0, run again with "
            f"checkpoint.resume=none (this truncates {run_dir / 'metrics.jsonl'} and "
            f"overwrites the checkpoints of the same steps); to resume from a checkpoint "
            f"elsewhere, checkpoint.resume=PATH")
    return scan.latest, [f"warning: resume skips an unusable checkpoint: {reason}"
                         for reason in reasons]


def _compare_settings(cfg, run_dir: Path, path: Path) -> List[str]:
    """Refuses (ConfigError) a resume whose RESUME_SETTINGS differ from the checkpoint's,
    unless checkpoint.allow_changed_settings; returns the warnings for the log."""
    saved = read_marker(path).get("state", {}).get("settings")
    if saved is None:
        return [f"warning: checkpoint {path} does not record {', '.join(RESUME_SETTINGS)} "
                "(an older save): the resume cannot check that they are unchanged"]
    now = settings_of(cfg)
    changed = [f"{key}={saved[key]} in the checkpoint, {now[key]} now"
               for key in RESUME_SETTINGS if key in saved and saved[key] != now[key]]
    if not changed:
        return []
    what = f"checkpoint {path} was saved with other settings: {'; '.join(changed)}"
    if cfg.checkpoint.allow_changed_settings:
        return [f"warning: {what}; resuming anyway (checkpoint.allow_changed_settings=true): "
                "the data order or the updates from here on differ from the saved run's"]
    raise ConfigError(
        f"{what}. Resuming would change the run silently (the global batch size, the seed, "
        "the held-out fraction and the packing set the data order, the learning rate the "
        "updates). "
        "Restore them, resume anyway with checkpoint.allow_changed_settings=true, or start "
        "over from step 0 "
        f"with checkpoint.resume=none (this truncates {run_dir / 'metrics.jsonl'})")
