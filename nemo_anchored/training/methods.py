"""The training objectives of the paper's methods, on vocab-sharded logits at the last stage.

Every method is a per-token loss masked to response tokens. The loss function hands megatron's
schedule the SUM over the micro-batch's valid tokens and their count; with
``calculate_per_token_loss`` the schedule and ``finalize_model_grads`` divide the gradients by
the valid tokens of the whole global batch (all micro-batches, all data-parallel ranks), so the
objective is the same number whatever the DP size and micro-batch split.

    sft, low_sft  CE on response tokens (low_sft is a recipe: lr 1e-6)
    kl_sft        CE + lambda * KL(p_theta || p_ref), fixed reference
    dft           exp(-CE).detach() * CE (Dynamic Fine-Tuning)
    stm           CE on the response tokens whose base-model perplexity is <= a threshold
    anchored      KL(q || p_theta), q between the current model and the SFT reference

Each micro-batch also reports sums for the step's metrics (see ``MicroBatchSums``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core import parallel_state

from nemo_anchored.ops import (anchor_diagnostics, anchored_kl, dft_loss, reverse_kl,
                               token_cross_entropy)

# Beyond float rounding, the anchor step must never exceed its lemma bound.
BOUND_RTOL, BOUND_ATOL = 1e-4, 1e-6


class MethodLoss:
    """loss_fn(policy, reference, snapshot, batch) for ``parallel.schedule.forward_backward``."""

    def __init__(self, cfg, *, stm_keep: Optional[torch.Tensor] = None):
        self.method = cfg.method
        self.anchor = cfg.anchor
        self.kl_lambda = cfg.baselines.kl_lambda
        self.diagnostics_every = cfg.logging.diagnostics_every
        self.stm_keep = stm_keep  # [num_examples, seq_length] bool, stm only
        self.step = 0  # set by the trainer: diagnostics run every N steps

    def __call__(self, policy, reference, snapshot, batch):
        tp_group = parallel_state.get_tensor_model_parallel_group()
        mask = batch["loss_mask"].to(policy.device, torch.float32)
        if self.method == "stm":
            mask = mask * self.stm_keep[batch["index"]].to(mask.device, mask.dtype)
        sums: Dict[str, torch.Tensor] = {}

        # The monitoring passes (trust-region diagnostic, KL to the reference when it is not
        # part of the loss) cost extra passes over the logits: every diagnostics_every steps.
        diagnose = bool(self.diagnostics_every) and self.step % self.diagnostics_every == 0
        if self.method == "anchored":
            a = self.anchor
            options = dict(current_logits=snapshot, alpha=a.alpha, interpolation=a.interpolation,
                           temperature=a.temperature, tp_group=tp_group, backend=a.backend)
            per_token = anchored_kl(policy, reference, **options)
            sums["anchored_kl"] = (per_token.detach() * mask).sum()
            if diagnose:
                sums.update(self._diagnostics(policy.detach(), reference, mask, options))
        else:
            ce = token_cross_entropy(policy, batch["labels"].to(policy.device),
                                     tp_group=tp_group)
            sums["ce"] = (ce.detach() * mask).sum()
            per_token = dft_loss(ce) if self.method == "dft" else ce
        if reference is not None and (self.method == "kl_sft" or diagnose):
            kl_ref = reverse_kl(policy if self.method == "kl_sft" else policy.detach(),
                                reference, tp_group=tp_group)
            sums["kl_policy_ref"] = (kl_ref.detach() * mask).sum()
            if self.method == "kl_sft":
                per_token = per_token + self.kl_lambda * kl_ref

        loss_sum = (per_token * mask).sum()
        tokens = mask.sum()
        sums.update(loss=loss_sum.detach(), tokens=tokens)
        return loss_sum, tokens.to(torch.int), sums

    @staticmethod
    def _diagnostics(policy, reference, mask, options):
        """Trust-region diagnostic of the anchor step, summed over the valid tokens."""
        d = anchor_diagnostics(policy, reference, **options)
        over = d["anchor_step_kl"] > d["bound"] * (1 + BOUND_RTOL) + BOUND_ATOL
        return {"anchor_step_kl": (d["anchor_step_kl"] * mask).sum(),
                "anchor_bound": (d["bound"] * mask).sum(),
                "tokens_over_bound": (over.float() * mask).sum(),
                "diagnostic_tokens": mask.sum(),
                "entropy": (d["entropy"] * mask).sum()}
