"""What stops a run that went wrong before it does harm: non-finite values caught before the
weights or a checkpoint take them in (the trainer's ``_stop_if_non_finite``, ``_checkpoint``)."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from nemo_anchored.errors import UserError


class TrainingDiverged(FloatingPointError, UserError):
    """The run stopped because training diverged: a non-finite loss, gradient or weight, or a
    collapse to a constant output. The message names the step and the likely cause."""


def gradients(model) -> List[torch.Tensor]:
    """The gradients megatron's optimizer is about to apply: the DDP buffers' ``main_grad``,
    complete once the schedule has finalised them (the distributed optimizer's reduce-scatter
    leaves each rank's shard reduced and the rest local: a NaN shows in one or the other)."""
    return [p.main_grad for p in model.parameters()
            if p.requires_grad and getattr(p, "main_grad", None) is not None]


def any_non_finite(tensors: List[torch.Tensor], device) -> bool:
    """Whether any rank holds a NaN or inf in its ``tensors`` (one all-reduce over the world,
    so every rank gets the same answer and can stop together).

    Checked before megatron's ``optimizer.step()``, which applies a NaN gradient in fp32 and
    bf16 (only fp16's loss scaler looks for inf/nan); a NaN on one rank would reach the others'
    weights through the data-parallel reduction or the next pipeline step."""
    local = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else True
    flag = torch.tensor([0.0 if local else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
