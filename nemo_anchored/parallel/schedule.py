"""Forward/backward over micro-batches with megatron's schedules, for ``CoResidentModels``.

``forward_backward`` picks megatron's schedule for the current layout (no pipelining at PP=1,
non-interleaved 1F1B at PP>1), tells the 1F1B schedule that stages exchange the concatenated
hidden streams of all resident models, and hands the loss function the logits of every resident
model for each micro-batch on the last stage.

Data: every pipeline stage iterates the same micro-batches. A micro-batch is a dict with
``tokens`` ``[b, s]`` and ``position_ids`` ``[b, s]`` (used on the first stage), an optional
``attention_mask`` (None: causal), and whatever the loss function needs (labels, loss mask, ...).
"""

import contextlib
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

MicroBatch = Dict[str, Any]

# loss_fn(policy_logits, reference_logits, snapshot_logits_or_None, micro_batch) returns what
# megatron's schedules expect from a loss function: (loss_sum, num_tokens, logged_dict), where
# the schedule divides loss_sum by num_tokens and by the number of micro-batches, or
# (loss, logged_dict), divided by the number of micro-batches only. Only the policy logits carry
# gradients; all three are this rank's vocab shard [b, s, V_padded / TP].
ResidentLossFn = Callable[
    [torch.Tensor, torch.Tensor, Optional[torch.Tensor], MicroBatch], Tuple[Any, ...]
]


def _loss_on_last_stage(loss_fn: ResidentLossFn, batch: MicroBatch, logits: Sequence[torch.Tensor]):
    # logits: the model's last-stage output, one tensor (or None) per resident model in the
    # order (policy, reference, snapshot), e.g. models.co_resident.ResidentLogits.
    policy, reference, snapshot = logits
    return loss_fn(policy, reference, snapshot, batch)


def _forward_step(loss_fn: ResidentLossFn, data_iterator: Iterator[MicroBatch], model):
    batch = next(data_iterator)
    # Micro-batches come from host memory; the model's inputs go to its device (the loss
    # functions move what they read themselves).
    device = next(model.parameters()).device
    inputs = [None if batch.get(key) is None else batch[key].to(device, non_blocking=True)
              for key in ("tokens", "position_ids", "attention_mask")]
    output = model(*inputs)
    return output, partial(_loss_on_last_stage, loss_fn, batch)


def wrap_for_training(stack: torch.nn.Module, ddp_config=None) -> torch.nn.Module:
    """Wrap a ``CoResidentModels`` in megatron's ``DistributedDataParallel`` and hook up the
    schedules' gradient finalisation.

    DDP registers only the policy's parameters (the frozen ones have ``requires_grad=False``).
    ``finalize_model_grads`` then reduces the gradients that megatron does not reduce inside the
    backward pass: across data-parallel replicas, the tied embedding across the first and last
    pipeline stages, and the sequence-parallel norm weights across the TP group. Gradients are
    then in each parameter's ``main_grad``.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    ddp = DistributedDataParallel(config=stack.config, ddp_config=ddp_config, module=stack)
    stack.config.no_sync_func = ddp.no_sync
    stack.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def forward_backward(
    model: torch.nn.Module,
    data_iterator: Iterator[MicroBatch],
    loss_fn: ResidentLossFn,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> List[Any]:
    """Run forward (and backward) over ``num_microbatches`` micro-batches.

    ``model`` is a ``CoResidentModels``, possibly wrapped (megatron DDP / Float16Module).
    Gradients accumulate into the policy's parameters (or DDP's buffers). Returns, on the last
    pipeline stage, the logged dict of each micro-batch (empty list on other stages).
    """
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
        raise NotImplementedError(
            "the interleaved schedule cannot send the concatenated resident hidden streams"
        )
    extra = {}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        extra["adjust_tensor_shapes_fn"] = get_attr_wrapped_model(model, "adjust_tensor_shapes")
    # megatron's schedules record autograd graphs even with forward_only; the returned dicts
    # would then hold every micro-batch's activations alive at once.
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss_fn),
            data_iterator=data_iterator,
            model=model,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
            **extra,
        )
