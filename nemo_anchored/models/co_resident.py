"""The trainable policy and its frozen companions (SFT reference, policy snapshot) as one module.

Anchored Learning needs, for every micro-batch, the logits of the policy and of one or two frozen
models of the same architecture and parallel layout. ``CoResidentModels`` runs them side by side
on each rank. Under pipeline parallelism the stages exchange ONE tensor per micro-batch: the
hidden streams of all resident models concatenated along the hidden dimension
(``[s, b, n_models * h]``); each stage splits it, runs every model's layers, and concatenates
again. So the last stage holds all logits of the same micro-batch, in megatron's vocab-sharded
layout, with no extra pass and no full-vocabulary gather.

The schedules must be told about the wider tensor (``adjust_tensor_shapes``); megatron's
non-interleaved 1F1B schedule accepts that hook, the interleaved one does not.

Gradients flow only through the policy's slice of the exchanged tensor: the frozen models run
under ``no_grad`` in eval mode, hold no gradients and are invisible to megatron's DDP and
optimizer (both skip parameters with ``requires_grad=False``).
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from megatron.core.transformer.module import MegatronModule

from nemo_anchored.models.gpt import mask_padded_vocab


class ResidentLogits(NamedTuple):
    """This rank's vocab shard ``[b, s, V_padded / TP]`` of each resident model's logits
    (None for a model that is not resident)."""

    policy: torch.Tensor
    reference: Optional[torch.Tensor]
    snapshot: Optional[torch.Tensor]


class CoResidentModels(MegatronModule):
    """A policy ``GPTModel`` plus an optional frozen reference and an optional frozen snapshot
    (a snapshot needs a reference). Plain SFT runs the policy alone through the same path.

    The policy is the attribute ``module``: megatron's helpers that look through wrappers
    (``get_attr_wrapped_model``, ``unwrap_model``, ``finalize_model_grads``) then find the policy,
    whose embedding is the one whose gradients are synchronised across pipeline stages. Wrap
    this module (not the policy) in megatron's ``DistributedDataParallel`` for training.

    ``forward`` returns the concatenated hidden streams on a non-last pipeline stage and
    ``ResidentLogits`` (padded vocabulary columns at -inf) on the last stage.
    """

    def __init__(self, policy, reference=None, snapshot=None):
        super().__init__(config=policy.config)
        if snapshot is not None and reference is None:
            raise ValueError("a snapshot is only resident beside a reference")
        frozen = [m for m in (reference, snapshot) if m is not None]
        for model in frozen:
            # The stages exchange equal-width streams: same stage, same hidden size.
            if (model.pre_process, model.post_process, model.config.hidden_size) != (
                policy.pre_process, policy.post_process, policy.config.hidden_size
            ):
                raise ValueError("resident models must share the pipeline stage and hidden size")
            model.requires_grad_(False)
            model.eval()
        self.module = policy
        self.reference = reference
        self.snapshot = snapshot
        # Read by megatron's pipeline schedules (0.16.x) from the module they are given. The
        # stage flags (pre_process, ...) are deliberately not mirrored here: megatron looks them
        # up to find the module that owns the embedding, which must be the policy.
        self.model_type = policy.model_type
        self.unpadded_vocab_size = getattr(policy, "unpadded_vocab_size", policy.vocab_size)

    @property
    def policy(self):
        return self.module

    @property
    def frozen_models(self) -> List[torch.nn.Module]:
        return [m for m in (self.reference, self.snapshot) if m is not None]

    @property
    def num_streams(self) -> int:
        return 1 + len(self.frozen_models)

    def train(self, mode: bool = True):
        """Switch the policy only: frozen models always run in eval mode (no dropout)."""
        self.training = mode
        self.module.train(mode)
        return self

    def adjust_tensor_shapes(
        self, recv_shapes: Sequence[Tuple[int, ...]], send_shapes: Sequence[Tuple[int, ...]]
    ) -> Tuple[List[Tuple[int, ...]], List[Tuple[int, ...]]]:
        """``adjust_tensor_shapes_fn`` for megatron's 1F1B schedule: widen the hidden dim."""

        def widen(shapes):
            return [(*shape[:-1], shape[-1] * self.num_streams) for shape in shapes]

        return widen(recv_shapes), widen(send_shapes)

    def set_input_tensor(self, input_tensor: Union[torch.Tensor, List, None]) -> None:
        """Split the tensor received from the previous stage into one stream per model."""
        if isinstance(input_tensor, list):
            if len(input_tensor) != 1:
                raise ValueError("expected one input tensor per micro-batch")
            input_tensor = input_tensor[0]
        models = [self.module, *self.frozen_models]
        if input_tensor is None:  # first pipeline stage: every model embeds the tokens itself
            for model in models:
                model.set_input_tensor(None)
            return
        streams = torch.chunk(input_tensor, self.num_streams, dim=-1)
        # The policy's slice stays in the graph so the schedule's `input_tensor.grad` gets its
        # gradient (zeros in the frozen columns). Copies, because the layers expect contiguous
        # activations.
        self.module.set_input_tensor(streams[0].contiguous())
        for model, stream in zip(self.frozen_models, streams[1:]):
            model.set_input_tensor(stream.detach().contiguous())

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Union[torch.Tensor, ResidentLogits]:
        policy_out = self.module(input_ids, position_ids, attention_mask, **kwargs)
        with torch.no_grad():
            frozen_out = [
                model(input_ids, position_ids, attention_mask, **kwargs)
                for model in self.frozen_models
            ]
        if not self.module.post_process:
            return torch.cat([policy_out, *frozen_out], dim=-1)
        policy, *frozen = (
            mask_padded_vocab(logits, self.unpadded_vocab_size)
            for logits in (policy_out, *frozen_out)
        )
        frozen += [None] * (2 - len(frozen))  # (reference, snapshot), absent ones as None
        return ResidentLogits(policy, *frozen)

    @torch.no_grad()
    def refresh_snapshot(self) -> None:
        """Copy the policy's current weights into the snapshot (start of an outer iteration)."""
        if self.snapshot is None:
            raise RuntimeError("this stack has no snapshot model")
        self.snapshot.load_state_dict(self.module.state_dict(), strict=True)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The policy's distributed-checkpoint state: frozen models are not training state."""
        return self.module.sharded_state_dict(prefix, sharded_offsets, metadata)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict_for_save_checkpoint(prefix=prefix, keep_vars=keep_vars)
