"""The baselines' losses on vocab-sharded logits: token cross-entropy, reverse KL, DFT and STM.

Per token, every softmax over the FULL vocabulary (see docs/design/baselines.md):

    SFT:     ce = -log p(y),                      d ce / d z = p - onehot(y)
    KL-SFT:  ce + lambda * KL(p || p_ref),        d KL / d z = p * (log p - log p_ref - KL)
    DFT:     -sg(p(y)) log p(y) = exp(-ce).detach() * ce
    STM:     keep the tokens with exp(ce_base) <= threshold (ce_base under the base model)

The layout and evaluation are vocab_parallel.py's (megatron-core's ``parallel_output=True``:
each tensor-parallel rank holds a contiguous shard [..., V_local] of the vocabulary): a local
pass for the softmax statistics, a tiny cross-rank merge (``combine_softmax_stats``, plus one
all-reduce of a float per row), and a local pass for the loss and its gradient shard, written
by hand during the forward pass.

Accumulation is in fp32 whatever the input dtype (float64 stays float64, for tests); gradients
are rounded once to the logits' dtype. The inputs are never modified (megatron-core's
``vocab_parallel_cross_entropy`` does modify fp32 logits in place).

Non-finite inputs: -inf marks a column with no mass (padded vocabulary) and is exact. A NaN or
+inf anywhere in a row makes that row's loss NaN; nothing is raised for it (see anchored_kl.py).
"""
from __future__ import annotations

import math

import torch

from nemo_anchored.ops.vocab_parallel import (all_reduce_sum, check_like_policy, check_logits,
                                              check_shards_agree, combine_softmax_stats,
                                              g_small, group_rank, group_size, per_token_loss,
                                              rows, softmax_stats)

# --------------------------------------------------------------------------------------------
# Per-row losses and gradient shards on 2-D [rows, V_local] logits.


def _cross_entropy_rows(z, labels, tp_group, need_grad):
    """-log p(label) per row (same on every rank) and the local gradient shard p - onehot.

    labels: [rows] int64 indices into the full vocabulary, already checked to lie in it.
    """
    # 1. Local pass: softmax statistics, and the label's logit where this rank holds it.
    stats = softmax_stats(z if z.dtype == torch.float64 else z.float())
    local = labels - group_rank(tp_group) * z.shape[-1]
    held = (local >= 0) & (local < z.shape[-1])
    index = torch.where(held, local, 0).unsqueeze(-1)
    label_logit = torch.where(held, z.gather(-1, index).squeeze(-1).to(stats.dtype), 0.0)

    # 2. Merge: the full-vocabulary log-sum-exp; the label's logit from the one rank holding it
    # (the others add an exact 0, so the sum is exact and the same on every rank).
    top, log_sum = combine_softmax_stats(stats, tp_group)[:, 0].unbind(-1)
    all_reduce_sum(label_logit, tp_group)
    loss = (top - label_logit) + log_sum
    if not need_grad:
        return loss, None

    # 3. Local pass: the gradient shard p - onehot(label). copy=True: for fp32 logits .to()
    # would return the input itself, which the in-place ops below must not touch.
    p = z.to(stats.dtype, copy=True).sub_(top[:, None]).sub_(log_sum[:, None]).exp_()
    p.scatter_add_(-1, index, -held.to(p.dtype).unsqueeze(-1))
    return loss, p.to(z.dtype)


def _reverse_kl_rows(z, r, tp_group, need_grad):
    """KL(p || p_ref) per row (same on every rank) and the local gradient shard."""
    grad_dtype = z.dtype
    # 1. Local pass: (max, sum-exp) of the policy and reference streams.
    stats = softmax_stats(*(x if x.dtype == torch.float64 else x.float() for x in (z, r)))

    # 2. Merge: full-vocabulary (max, log sum-exp), [rows, 1] per stream.
    top, log_sum = combine_softmax_stats(stats, tp_group).unbind(-1)
    (top_p, top_r), (log_sum_p, log_sum_r) = top.split(1, -1), log_sum.split(1, -1)

    # 3. Local pass. y = log p - log p_ref is formed from the raw logit difference first, so it
    # is exact where the two models agree (the KL-SFT policy starts at its reference).
    z, r = z.to(stats.dtype), r.to(stats.dtype)
    y = (z - r) - ((top_p - top_r) + (log_sum_p - log_sum_r))
    p = torch.exp((z - top_p) - log_sum_p)
    p_ref = torch.exp((r - top_r) - log_sum_r)
    # KL = sum_v (p y - p + p_ref), since both sum to 1. Each term is p_ref g(y) >= 0 with
    # g(y) = y e^y - e^y + 1, so no cancellation across columns and a tiny KL stays accurate;
    # near y = 0, g comes from its series. Columns with p = 0 (padding in both when p_ref = 0
    # too) contribute p_ref; p > 0 with p_ref = 0 gives y = +inf and an infinite KL.
    small = y.abs() < 0.5
    y_small = torch.where(small, y, torch.zeros_like(y))
    term = torch.where(small, p_ref * g_small(y_small),
                       torch.where(p == 0, p_ref, p * y - p + p_ref))
    partials = [term.sum(dim=-1)]
    if need_grad:
        # The gradient p (y - KL) takes the KL as E_p[y], its other form: computed from the same
        # y, it cancels the rounding shift that y inherits from the two log-sum-exps (~1e-7,
        # not small next to y where the models nearly agree).
        p_times_y = torch.where(p > 0, p * y, torch.zeros_like(p))
        partials.append(p_times_y.sum(dim=-1))
    partials = all_reduce_sum(torch.stack(partials, dim=-1), tp_group)
    kl = partials[:, 0].contiguous()
    if not need_grad:
        return kl, None
    grad = torch.where(p > 0, p * (y - partials[:, 1:]), torch.zeros_like(p))
    return kl, grad.to(grad_dtype)


# --------------------------------------------------------------------------------------------
# Argument checking (ValueError naming the argument, as vocab_parallel's checks).


def _check_labels(labels, logits, tp_group):
    if (not isinstance(labels, torch.Tensor) or labels.dtype == torch.bool
            or labels.is_floating_point() or labels.is_complex()):
        raise ValueError("labels must be an integer tensor")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, logits "
                         f"{tuple(logits.shape)}: labels must be shaped like logits without "
                         "the vocabulary dimension")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device}, logits on {logits.device}: they must "
                         "be on one device")
    if labels.numel() == 0:
        return
    vocab = logits.shape[-1] * group_size(tp_group)
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one device sync for both bounds
    if low < 0 or high >= vocab:
        raise ValueError(f"labels must lie in [0, {vocab}) (indices into the full vocabulary), "
                         f"got values in [{low}, {high}]; leave ignored positions out with a "
                         "loss mask, not an out-of-range label")


# --------------------------------------------------------------------------------------------
# Public API.


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                        tp_group=None) -> torch.Tensor:
    """Per-token cross-entropy -log p(label) over the full vocabulary, shape ``labels.shape``.

    Args:
        logits: [..., V_local] fp32, bf16 or fp16 (fp64 for tests), this rank's vocabulary
            shard; differentiable: the gradient is p - onehot(label) times the incoming
            gradient, computed in fp32 and returned in the logits' dtype.
        labels: [...] integer indices into the FULL vocabulary [0, V_local * TP), the same on
            every rank. A label at a -inf (padded) column gives +inf.
        tp_group: the process group over which the last dimension is sharded (None: unsharded).

    Returns:
        fp32 per-token loss (fp64 for fp64 logits), identical on every rank of ``tp_group``.
        Mask and average it in the caller, e.g. ``(loss * mask).sum() / mask.sum()``.
    """
    check_logits(logits, "logits")
    _check_labels(labels, logits, tp_group)
    check_shards_agree(logits, tp_group)
    z, y = rows(logits.detach()), labels.reshape(-1).long()
    return per_token_loss(logits, lambda need_grad: _cross_entropy_rows(z, y, tp_group, need_grad))


def reverse_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, *,
               tp_group=None) -> torch.Tensor:
    """Per-token KL(p_theta || p_ref) over the full vocabulary, shape ``policy_logits.shape[:-1]``.

    The KL-SFT regulariser (loss = CE + lambda * KL, lambda = 0.2 in the paper).

    Args:
        policy_logits: [..., V_local] fp32, bf16 or fp16 (fp64 for tests); the only
            differentiable input: the gradient is p * (log p - log p_ref - KL) times the
            incoming gradient, computed in fp32 and returned in the policy logits' dtype.
        reference_logits: the frozen reference's logits, same shape, dtype and device.
            Padded columns must be -inf in both inputs (they then contribute nothing); a
            column where p > 0 and p_ref = 0 gives +inf (and a non-finite gradient).
        tp_group: the process group over which the last dimension is sharded (None: unsharded).

    Returns:
        fp32 per-token loss (fp64 for fp64 logits), identical on every rank of ``tp_group``.
    """
    check_logits(policy_logits, "policy_logits")
    check_like_policy(reference_logits, "reference_logits", policy_logits)
    check_shards_agree(policy_logits, tp_group)
    z, r = rows(policy_logits.detach()), rows(reference_logits.detach())
    return per_token_loss(policy_logits,
                          lambda need_grad: _reverse_kl_rows(z, r, tp_group, need_grad))


def dft_loss(ce: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning per token: -sg(p(y)) log p(y) = exp(-ce).detach() * ce.

    ``ce`` is the per-token cross-entropy from :func:`token_cross_entropy`; the weight p(y) is
    detached, so the gradient is p(y) times the CE gradient. Where p(y) = 0 (ce = +inf) the loss
    is 0, the limit of p log p, rather than 0 * inf = NaN, which would poison a masked mean.
    """
    if not isinstance(ce, torch.Tensor) or not ce.is_floating_point():
        raise ValueError("ce must be a floating-point tensor")
    weighted = torch.exp(-ce).detach() * ce
    return torch.where(torch.isposinf(ce), torch.zeros_like(weighted), weighted)


def stm_keep_mask(base_ce: torch.Tensor, threshold: float) -> torch.Tensor:
    """Low-perplexity token learning (STM): which response tokens to keep, as a bool tensor.

    keep = exp(base_ce) <= threshold, with ``base_ce`` the per-token cross-entropy under the
    BASE model (computed once before training): tokens whose base-model perplexity exceeds the
    threshold (2.5 in the original work) are dropped from the loss. A NaN ce is dropped.
    Multiply the result into the loss mask.
    """
    if not isinstance(base_ce, torch.Tensor) or not base_ce.is_floating_point():
        raise ValueError("base_ce must be a floating-point tensor")
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
            or math.isnan(threshold) or threshold <= 0):
        raise ValueError(f"threshold must be a number > 0, got {threshold!r}")
    return torch.exp(base_ce.detach()) <= threshold
