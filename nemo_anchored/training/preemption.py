"""Preemption: SIGTERM, SIGUSR1, SIGINT (Ctrl-C) or SIGHUP (a closed terminal) to any rank ends
the run at the next step boundary, with a checkpoint and exit status 0, so that a requeued job
resumes exactly. A second SIGINT does not wait for the boundary: it raises KeyboardInterrupt at
once (what is being saved then stays an incomplete save, which never loads).

The handler only records the signal: Python runs it between two bytecodes of the main thread,
possibly inside a collective's caller or a checkpoint save, where nothing else is safe. At each
step boundary every rank all-reduces the record (MAX) over the world group, so all ranks agree
on the same boundary and none saves alone; the trainer then takes the ordinary atomic save path
(training/trainer.py). A signal that arrives while a rank is blocked in a collective is seen
when the collective returns. Which process gets the signal under torchrun and Slurm:
docs/design/cluster.md.
"""
from __future__ import annotations

import signal
from typing import Dict, Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class Preempted(Exception):
    """The run stopped at a step boundary on request; its checkpoint (if any) is saved."""


class PreemptionSignals:
    """Records SIGNALS while entered (handlers restored on exit) and tells the ranks, together,
    whether any of them got one."""

    def __init__(self):
        self.received = 0  # the signal number; 0: none
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "PreemptionSignals":
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: now, not at the step boundary
        self.received = signum

    def agreed(self, device: torch.device) -> Optional[signal.Signals]:
        """The signal any rank received (the highest number when several did), or None.
        Collective over the world group: every rank calls it at the same step boundary."""
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag.item())) if flag.item() else None
