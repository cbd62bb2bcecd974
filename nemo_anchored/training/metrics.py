"""Per-step metrics: a JSON-lines file, TensorBoard, the experiment trackers that the config
enables (trackers.py), and a progress bar with ETA (rank 0 only).

Every record carries ``step`` (the global optimizer step). A training step's record has no
``event`` key; every other record has one: outer-iteration boundaries are
``"event": "outer_iteration_start"`` / ``"outer_iteration_end"`` (and TensorBoard text), and a
validation pass after a step is ``"event": "validation"`` with its ``valid/...`` metrics, which
TensorBoard and the trackers get as scalars beside the training step's ``train/...``. The
resolved config is TensorBoard's hyper-parameters and the trackers'. After a resume the file
is cut back to the checkpoint's step first, so it never holds two records of one step; a last
record torn by a crash or a full disk is dropped then, with a warning.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm

from nemo_anchored.atomic import write_text
from nemo_anchored.errors import UserError
from nemo_anchored.training.trackers import flat_config, open_trackers


class MetricsFileError(ValueError, UserError):
    """A metrics file damaged before its last line, which a resume cannot cut back safely."""


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, resume_step: int, enabled: bool,
                 tensorboard: bool, progress: bool, config=None):
        """``config``: the run's resolved config, for the hyper-parameters and the trackers
        it enables (None: neither)."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.trackers = []
        self.bar: Optional[tqdm] = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self.file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                        purge_step=resume_step + 1)
            if config is not None:
                self._tensorboard_hparams(flat_config(config))
        # Made at the first step, so the set-up messages print before it.
        self.bar_settings = dict(total=total_steps, initial=resume_step) if progress else None
        if config is not None:
            try:
                self.trackers = open_trackers(config)
            except BaseException:
                self.close()
                raise

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to ``step``. A last line that is no record is one torn by a
        crash or a full disk: dropped, with a warning. Anywhere else it is damage: an error
        naming the line, and the file is left as it is."""
        if not self.path.exists():
            return
        lines = [(number, line) for number, line in
                 enumerate(self.path.read_bytes().split(b"\n"), start=1) if line.strip()]
        kept = []
        for number, line in lines:
            try:
                record = json.loads(line)  # bytes: text that is not UTF-8 is a ValueError too
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as err:
                if number != lines[-1][0]:
                    raise MetricsFileError(
                        f"{self.path} line {number} is not a metrics record ({err}): the file "
                        "is damaged; repair or delete that line, then resume") from err
                print(f"warning: {self.path} line {number} is an incomplete record (cut off by "
                      "a crash or a full disk): dropped", file=sys.stderr)
                continue
            if record.get("step", 0) <= step:
                kept.append(line.decode() + "\n")
        write_text(self.path, "".join(kept))

    def _tensorboard_hparams(self, flat: Dict[str, object]) -> None:
        """Written into the run's own event file: ``add_hparams`` would start another one."""
        from torch.utils.tensorboard.summary import hparams

        shown = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                 for k, v in flat.items()}
        for summary in hparams(shown, {}):
            self.writer.file_writer.add_summary(summary)

    def _scalars(self, metrics: Dict[str, object], step: int) -> None:
        """The finite numbers of ``metrics`` to TensorBoard and the trackers."""
        numbers = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(numbers, step)

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        self._scalars({f"train/{k}": v for k, v in record.items() if k != "step"}, step)
        if self.bar is None and self.bar_settings is not None:
            self.bar = tqdm(unit="step", dynamic_ncols=True, **self.bar_settings)
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "anchor_step_kl", "lr") if k in record}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(1)

    def log_event(self, step: int, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"step": step, "event": event, **fields}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            self.writer.add_text("events", json.dumps(record), step)
        message = f"[step {step}] {event} " + " ".join(f"{k}={v}" for k, v in fields.items())
        (self.bar.write if self.bar is not None else print)(message)

    def log_validation(self, step: int, metrics: Dict[str, float]) -> None:
        """A validation pass after ``step``: ``metrics`` named ``valid/...``."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "event": "validation", **metrics}) + "\n")
        self.file.flush()
        self._scalars(metrics, step)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "valid/time_s")
        self.info(f"[step {step}] validation {shown}")

    def info(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close()
        self.file.close()
