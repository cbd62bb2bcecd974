"""Per-step metrics: a JSON-lines file, TensorBoard, and a progress bar with ETA (rank 0 only).

Every record carries ``step`` (the global optimizer step); outer-iteration boundaries are
records with ``"event": "outer_iteration_start"`` / ``"outer_iteration_end"`` (and TensorBoard
text). After a resume the file is cut back to the checkpoint's step first, so it never holds
two records of one step; a last record torn by a crash or a full disk is dropped then, with a
warning.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from nemo_anchored.atomic import write_text
from nemo_anchored.errors import UserError


class MetricsFileError(ValueError, UserError):
    """A metrics file damaged before its last line, which a resume cannot cut back safely."""


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, resume_step: int, enabled: bool,
                 tensorboard: bool, progress: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
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
        # Made at the first step, so the set-up messages print before it.
        self.bar_settings = dict(total=total_steps, initial=resume_step) if progress else None

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

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, step)
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
        self.file.close()
