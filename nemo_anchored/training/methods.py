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

Each micro-batch also reports sums for the step's metrics: a method declares which
(``sum_keys``), and turns their totals over the step into its entries of the step's record
(``metrics``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_anchored.config import ConfigError
from nemo_anchored.ops import dft_loss, reverse_kl, stm_keep_mask, token_cross_entropy
from nemo_anchored.ops.anchored_kl import anchored_kl, anchored_kl_and_diagnostics

# Beyond float rounding, the anchor step must never exceed its lemma bound.
BOUND_RTOL, BOUND_ATOL = 1e-4, 1e-6

Sums = Dict[str, torch.Tensor]


class MethodLoss:
    """loss_fn(policy, reference, snapshot, batch) for ``parallel.schedule.forward_backward``:
    the method's loss summed over the micro-batch's valid tokens, their count, and its sums.
    ``MethodLoss.for_config(cfg)`` builds the run's method."""

    # The sums besides "loss" and "tokens" that a micro-batch may report whose means over the
    # valid tokens are metrics of the step, in the record's order.
    token_means: Tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.step = 0  # set by the trainer before each step

    @staticmethod
    def for_config(cfg) -> MethodLoss:
        return _METHODS[cfg.method](cfg)

    @property
    def sum_keys(self) -> Tuple[str, ...]:
        """Every sum a micro-batch may report: what the trainer reduces over the step."""
        return ("loss", "tokens", *self.token_means)

    def prepare(self, forward_over_dataset: Callable[[Callable], List[Sums]], dataset,
                device) -> Optional[str]:
        """Once before training: the method's pass over the data, if it has one; returns a line
        for the log. ``forward_over_dataset(loss_fn)``: the last stage's outputs of ``loss_fn``
        for every example once, in order, from the models as built (no backward)."""
        return None

    def __call__(self, policy, reference, snapshot, batch):
        mask = self._loss_mask(batch, policy.device)
        per_token, sums = self._per_token(policy, reference, snapshot, batch, mask)
        loss_sum = per_token.sum()
        tokens = mask.sum()
        sums.update(loss=loss_sum.detach(), tokens=tokens)
        return loss_sum, tokens.to(torch.int), sums

    def metrics(self, totals: Dict[str, float], tokens: float) -> dict:
        """The method's entries of the step's record from the step's totals of ``sum_keys``
        (NaN: not reported this step); ``tokens``: the valid tokens, NaN when none."""
        return {key: totals[key] / tokens for key in self.token_means
                if not math.isnan(totals[key])}

    def _loss_mask(self, batch, device) -> torch.Tensor:
        """The tokens in the loss: 1, the others 0 (data/sft.py's response tokens)."""
        return batch["loss_mask"].to(device, torch.float32)

    def _per_token(self, policy, reference, snapshot, batch, mask) -> Tuple[torch.Tensor, Sums]:
        """(the per-token loss times the mask, the micro-batch's sums besides loss and tokens).
        The losses take the mask as their weights: their CPU kernels then skip the masked tokens
        (most of a short example's), and the backward of the sum has nothing left to scale."""
        raise NotImplementedError


class CrossEntropy(MethodLoss):
    """sft and low_sft: CE on the response tokens."""

    token_means = ("ce",)

    def _per_token(self, policy, reference, snapshot, batch, mask):
        ce = token_cross_entropy(policy, batch["labels"].to(policy.device),
                                 tp_group=parallel_state.get_tensor_model_parallel_group(),
                                 backend=self.cfg.baselines.backend, weights=mask)
        return ce, {"ce": ce.detach().sum()}


class KlSft(CrossEntropy):
    """kl_sft: CE + lambda * KL(p_theta || p_ref)."""

    token_means = ("ce", "kl_policy_ref")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kl_lambda = cfg.baselines.kl_lambda

    def _per_token(self, policy, reference, snapshot, batch, mask):
        ce, sums = super()._per_token(policy, reference, snapshot, batch, mask)
        # lambda rides in the KL's weights: its kernels then write lambda x its gradient, and
        # the backward has no pass over the [tokens, V] gradient of its own to scale it. At
        # lambda = 0 the KL is only logged.
        lam = self.kl_lambda
        kl_ref = reverse_kl(policy if lam > 0 else policy.detach(), reference,
                            tp_group=parallel_state.get_tensor_model_parallel_group(),
                            backend=self.cfg.baselines.backend,
                            weights=mask * lam if lam > 0 else mask)
        sums["kl_policy_ref"] = kl_ref.detach().sum() / (lam if lam > 0 else 1.0)
        return (ce + kl_ref if lam > 0 else ce), sums


class Dft(CrossEntropy):
    """dft: exp(-CE).detach() * CE."""

    def _per_token(self, policy, reference, snapshot, batch, mask):
        ce, sums = super()._per_token(policy, reference, snapshot, batch, mask)
        return dft_loss(ce), sums  # of mask x ce: mask x dft_loss(ce), the mask being 0 or 1


class Stm(CrossEntropy):
    """stm: CE on the response tokens whose base-model perplexity is <= the threshold."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.keep: Optional[torch.Tensor] = None  # [num_examples, seq_length] bool

    def prepare(self, forward_over_dataset, dataset, device):
        """The token filter, once before training: keep a response token when its perplexity
        under the base model (the policy at this point) is <= the threshold."""
        threshold = self.cfg.baselines.stm_threshold
        tp_group = parallel_state.get_tensor_model_parallel_group()

        def base_ce(policy, reference, snapshot, batch):
            # Weighted by the data's loss mask (MethodLoss's: Stm's own needs the filter this
            # builds), the kernels skip the tokens outside it (ce 0 there, which `response`
            # below drops).
            ce = token_cross_entropy(policy, batch["labels"].to(policy.device),
                                     tp_group=tp_group, backend=self.cfg.baselines.backend,
                                     weights=MethodLoss._loss_mask(self, batch, policy.device))
            return ce.sum(), torch.tensor(1, dtype=torch.int), {"ce": ce, "index": batch["index"]}

        outputs = forward_over_dataset(base_ce)
        keep = torch.zeros(len(dataset), self.cfg.data.seq_length, dtype=torch.bool)
        # The passes fill their last micro-batch with repeats of the last row (validation's
        # with its loss mask 0: ce 0, "kept" everywhere), always after the row itself: the
        # first occurrence of a row is the one to keep.
        seen = torch.zeros(len(dataset), dtype=torch.bool)
        for out in outputs:  # last stage only; other stages never read the mask
            rows = stm_keep_mask(out["ce"], threshold).cpu()
            for row, index in zip(rows, out["index"].tolist()):
                if not seen[index]:
                    keep[index], seen[index] = row, True
        response = dataset.loss_mask > 0
        counts = torch.tensor([(keep & response).sum(), response.sum()], dtype=torch.float64,
                              device=device)
        dist.broadcast(counts, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        kept, total = counts.tolist()
        if kept == 0:
            raise ConfigError(f"baselines.stm_threshold: none of the {int(total)} response "
                              f"tokens has a base-model perplexity <= {threshold}; nothing "
                              "would be trained")
        self.keep = keep
        return f"stm keeps {int(kept)} of {int(total)} response tokens ({kept / total:.1%}) " \
               f"with base perplexity <= {threshold}"

    def _loss_mask(self, batch, device):
        mask = super()._loss_mask(batch, device)
        return mask * self.keep[batch["index"]].to(mask.device, mask.dtype)


class Anchored(MethodLoss):
    """anchored: KL(q || p_theta); every logging.diagnostics_every steps also the trust-region
    diagnostic of the anchor step and KL(p_theta || p_ref)."""

    token_means = ("anchored_kl", "kl_policy_ref")
    # Summed over the valid tokens of the diagnosed micro-batches, which diagnostic_tokens counts.
    diagnostic_sums = ("anchor_step_kl", "anchor_bound", "tokens_over_bound", "diagnostic_tokens",
                       "entropy")

    @property
    def sum_keys(self):
        return (*super().sum_keys, *self.diagnostic_sums)

    def _per_token(self, policy, reference, snapshot, batch, mask):
        a = self.cfg.anchor
        options = dict(current_logits=snapshot, alpha=a.alpha, interpolation=a.interpolation,
                       temperature=a.temperature,
                       tp_group=parallel_state.get_tensor_model_parallel_group(),
                       backend=a.backend, weights=mask)
        every = self.cfg.logging.diagnostics_every
        if every and self.step % every == 0:
            per_token, diagnostics = anchored_kl_and_diagnostics(policy, reference, **options)
            sums = self._diagnostic_sums(diagnostics, mask)
        else:
            per_token, sums = anchored_kl(policy, reference, **options), {}
        sums["anchored_kl"] = per_token.detach().sum()
        return per_token, sums

    @staticmethod
    def _diagnostic_sums(d, mask) -> Sums:
        over = d["anchor_step_kl"] > d["bound"] * (1 + BOUND_RTOL) + BOUND_ATOL
        return {"kl_policy_ref": (d["kl_policy_ref"] * mask).sum(),
                "anchor_step_kl": (d["anchor_step_kl"] * mask).sum(),
                "anchor_bound": (d["bound"] * mask).sum(),
                "tokens_over_bound": (over.float() * mask).sum(),
                "diagnostic_tokens": mask.sum(),
                "entropy": (d["entropy"] * mask).sum()}

    def metrics(self, totals, tokens):
        record = super().metrics(totals, tokens)
        if not math.isnan(totals["diagnostic_tokens"]):
            n = totals["diagnostic_tokens"]
            record.update(anchor_step_kl=totals["anchor_step_kl"] / n,
                          anchor_bound=totals["anchor_bound"] / n,
                          tokens_over_bound=int(totals["tokens_over_bound"]),
                          fraction_over_bound=totals["tokens_over_bound"] / n,
                          entropy=totals["entropy"] / n)
        return record


_METHODS = {"sft": CrossEntropy, "low_sft": CrossEntropy, "kl_sft": KlSft, "dft": Dft,
            "stm": Stm, "anchored": Anchored}
