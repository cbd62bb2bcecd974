"""The baselines' losses on vocab-sharded logits: token cross-entropy, reverse KL, DFT and STM.

Per token, every softmax over the FULL vocabulary (see docs/design/baselines.md):

    SFT:     ce = -log p(y),                      d ce / d z = p - onehot(y)
    KL-SFT:  ce + lambda * KL(p || p_ref),        d KL / d z = p * (log p - log p_ref - KL)
    DFT:     -sg(p(y)) log p(y) = exp(-ce).detach() * ce
    STM:     keep the tokens with exp(ce_base) <= threshold (ce_base under the base model)

The layout and evaluation are vocab_parallel.py's (megatron-core's ``parallel_output=True``:
each tensor-parallel rank holds a contiguous shard [..., V_local] of the vocabulary): a local
pass for the softmax statistics, a tiny cross-rank merge (one all-gather of a few floats per
row, plus one all-reduce of a float per row), and a local pass for the loss and its gradient
shard, written by hand during the forward pass, so that backward only scales it.

Two interchangeable kernel sets implement the local passes, as for anchored_kl:
``TorchKernels`` (plain PyTorch; float64 stays float64, the tests' reference) and
``FusedKernels`` (the C++/CUDA extension: the logits are read in their own dtype, never copied
to fp32; unsharded rows take one call that runs both passes per row). ``backend`` chooses.
DFT and STM are functions of the per-token cross-entropy ([tokens]-sized), so their work on
the logits is ``token_cross_entropy``'s kernels.

Accumulation is in fp32 whatever the input dtype (float64 stays float64 in the torch
kernels); gradients are rounded once to the logits' dtype. The inputs are never modified
(megatron-core's ``vocab_parallel_cross_entropy`` does modify fp32 logits in place).

Non-finite inputs: -inf marks a column with no mass (padded vocabulary) and is exact. A NaN or
+inf anywhere in a row makes that row's loss and gradient NaN; nothing is raised for it (see
anchored_kl.py).
"""
from __future__ import annotations

import math

import torch

from nemo_anchored.ops.vocab_parallel import (_C, all_reduce_sum, check_like_policy,
                                              check_logits, check_shards_agree,
                                              combine_softmax_stats,
                                              combine_softmax_stats_and_mean, finish_gradient,
                                              g_small, group_rank, group_size, native_weights,
                                              per_token_loss, rows, softmax_stats, use_fused,
                                              weigh_gradient, weight_rows)

# --------------------------------------------------------------------------------------------
# The local passes: two kernel sets with the same signatures, on 2-D [rows, V_local] logits z
# (policy) and r (reference). Statistics are [rows, streams, 2] (max, sum-exp) of z, then r;
# with r also weighted [rows] = sum_v exp(z_v - max_z) (z_v - r_v), which the merge turns into
# E_p[z - r]. Labels are [rows] column indices into this shard (outside it: no column here).
# weights: the loss's per-row weights or None, as in anchored_kl.py's kernels: the gradient
# comes back weighted, and a row of weight 0 may be skipped (its loss and statistics are 0).


class TorchKernels:
    """Plain PyTorch, in float32, or float64 for float64 inputs. Mirrors the per-column math of
    csrc/anchored_kl_math.h (whose comments explain the forms) with [rows, V] temporaries."""

    @staticmethod
    def _wide(x):
        return x if x.dtype == torch.float64 else x.float()

    def loss_stats(self, z, r, weights):
        z = self._wide(z)
        if r is None:
            return softmax_stats(z), None
        r = self._wide(r)
        stats = softmax_stats(z, r)
        top = stats[:, 0, :1]
        e = torch.exp(z - torch.where(top == -math.inf, torch.zeros_like(top), top))
        weighted = torch.where(e == 0, torch.zeros_like(e), e * (z - r)).sum(-1)
        return stats, weighted

    def cross_entropy_grad(self, z, labels, lse, weights):
        held = (labels >= 0) & (labels < z.shape[-1])
        index = torch.where(held, labels, 0).unsqueeze(-1)
        top, log_sum = lse[:, 0, :1], lse[:, 0, 1:]
        # copy=True: for fp32 logits .to() would return the input itself, which the in-place
        # ops below must not touch.
        p = z.to(lse.dtype, copy=True).sub_(top).sub_(log_sum).exp_()
        p.scatter_add_(-1, index, -held.to(p.dtype).unsqueeze(-1))
        return weigh_gradient(p.to(z.dtype), weights)

    def reverse_kl(self, z_in, r, lse, mean_difference, need_grad, weights):
        z, r = z_in.to(lse.dtype), r.to(lse.dtype)
        top, log_sum = lse.unbind(-1)  # each [rows, 2]: policy, reference
        p = torch.exp((z - top[:, :1]) - log_sum[:, :1])
        p_ref = torch.exp((r - top[:, 1:]) - log_sum[:, 1:])
        y = (z - r) - ((top[:, :1] - top[:, 1:]) + (log_sum[:, :1] - log_sum[:, 1:]))
        small = y.abs() < 0.5
        y_small = torch.where(small, y, torch.zeros_like(y))
        term = torch.where(small, p_ref * g_small(y_small),
                           torch.where(p == 0, p_ref, p * y - p + p_ref))
        grad = None
        if need_grad:
            grad = weigh_gradient(torch.where(
                p == 0, torch.zeros_like(p),
                p * ((z - r) - mean_difference[:, None])).to(z_in.dtype), weights)
        return term.sum(dim=-1), grad


class FusedKernels:
    """The C++/CUDA extension (csrc/sharded_losses_*.{cpp,cu}); the CPU kernels take the
    weights (vocab_parallel's ``native_weights``)."""

    @staticmethod
    def loss_stats(z, r, weights):
        return _C.loss_stats(z, r, native_weights(z, weights))

    @staticmethod
    def cross_entropy_grad(z, labels, lse, weights):
        native = native_weights(z, weights)
        return finish_gradient(_C.cross_entropy_grad(z, labels, lse, native), weights, native)

    @staticmethod
    def reverse_kl(z, r, lse, mean_difference, need_grad, weights):
        native = native_weights(z, weights)
        kl, grad = _C.reverse_kl_grad(z, r, lse, mean_difference, need_grad, native)
        return kl, finish_gradient(grad, weights, native)

    @staticmethod
    def cross_entropy_unsharded(z, labels, need_grad, weights):
        native = native_weights(z, weights)
        loss, grad = _C.cross_entropy_fused(z, labels, need_grad, native)
        return loss, finish_gradient(grad, weights, native)

    @staticmethod
    def reverse_kl_unsharded(z, r, need_grad, weights):
        native = native_weights(z, weights)
        kl, grad = _C.reverse_kl_fused(z, r, need_grad, native)
        return kl, finish_gradient(grad, weights, native)


def _kernels(logits, backend):
    return FusedKernels() if use_fused(logits, backend) else TorchKernels()


# --------------------------------------------------------------------------------------------
# Per-row losses (the same on every rank) and gradient shards.


def _cross_entropy_rows(z, labels, tp_group, kernels, need_grad, weights=None):
    """-log p(label) per row and the local gradient shard p - onehot(label), weighted by
    ``weights`` (the loss is not).

    labels: [rows] int64 indices into the full vocabulary, already checked to lie in it.
    """
    if group_size(tp_group) == 1 and hasattr(kernels, "cross_entropy_unsharded"):
        return kernels.cross_entropy_unsharded(z, labels, need_grad, weights)
    # 1. Local pass: softmax statistics; the label's logit where this rank holds it.
    stats, _ = kernels.loss_stats(z, None, weights)
    local = labels - group_rank(tp_group) * z.shape[-1]
    held = (local >= 0) & (local < z.shape[-1])
    index = torch.where(held, local, 0).unsqueeze(-1)
    label_logit = torch.where(held, z.gather(-1, index).squeeze(-1).to(stats.dtype), 0.0)

    # 2. Merge: the full-vocabulary log-sum-exp; the label's logit from the one rank holding it
    # (the others add an exact 0, so the sum is exact and the same on every rank).
    lse = combine_softmax_stats(stats, tp_group)
    top, log_sum = lse[:, 0].unbind(-1)
    all_reduce_sum(label_logit, tp_group)
    loss = (top - label_logit) + log_sum
    if not need_grad:
        return loss, None

    # 3. Local pass: the gradient shard.
    return loss, kernels.cross_entropy_grad(z, local, lse, weights)


def _reverse_kl_rows(z, r, tp_group, kernels, need_grad, weights=None):
    """KL(p || p_ref) per row and the local gradient shard p (y - KL), weighted by ``weights``
    (the loss is not)."""
    if group_size(tp_group) == 1 and hasattr(kernels, "reverse_kl_unsharded"):
        return kernels.reverse_kl_unsharded(z, r, need_grad, weights)
    # 1-2. Statistics of both streams and E_p[z - r] over the full vocabulary: the gradient's
    # KL is taken as E_p[y] = E_p[z - r] - (LSE_z - LSE_r), whose LSE part cancels against
    # y's own, so the gradient needs no all-reduce before it is written.
    stats, weighted = kernels.loss_stats(z, r, weights)
    lse, mean_difference = combine_softmax_stats_and_mean(stats, weighted, tp_group)
    # 3. Local pass: the partial KL and the gradient shard; one all-reduce of the partials.
    partial, grad = kernels.reverse_kl(z, r, lse, mean_difference, need_grad, weights)
    return all_reduce_sum(partial, tp_group), grad


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


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, tp_group=None,
                        backend: str = "auto",
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token cross-entropy -log p(label) over the full vocabulary, shape ``labels.shape``.

    Args:
        logits: [..., V_local] fp32, bf16 or fp16 (fp64 for tests), this rank's vocabulary
            shard; differentiable: the gradient is p - onehot(label) times the incoming
            gradient, computed in fp32 and returned in the logits' dtype.
        labels: [...] integer indices into the FULL vocabulary [0, V_local * TP), the same on
            every rank. A label at a -inf (padded) column gives +inf.
        tp_group: the process group over which the last dimension is sharded (None: unsharded).
        backend: "torch", "fused" or "auto" (fused when built for the device and dtype).
        weights: per-token weights shaped like labels, as anchored_kl's (there: what they buy).

    Returns:
        fp32 per-token loss (fp64 for fp64 logits), identical on every rank of ``tp_group``;
        with ``weights``, weights x loss, and 0 where a weight is 0. Mask and average it in the
        caller, e.g. ``(loss * mask).sum() / mask.sum()``, or pass the mask as ``weights``.
    """
    check_logits(logits, "logits")
    _check_labels(labels, logits, tp_group)
    kernels = _kernels(logits, backend)
    check_shards_agree(logits, tp_group)
    z, y = rows(logits.detach()), labels.reshape(-1).long().contiguous()
    w = weight_rows(weights, logits)
    return per_token_loss(logits, lambda need_grad: _cross_entropy_rows(
        z, y, tp_group, kernels, need_grad, w), w)


def reverse_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, *,
               tp_group=None, backend: str = "auto",
               weights: torch.Tensor | None = None) -> torch.Tensor:
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
        backend: "torch", "fused" or "auto" (fused when built for the device and dtype).
        weights: per-token weights shaped like the loss, as anchored_kl's.

    Returns:
        fp32 per-token loss (fp64 for fp64 logits), identical on every rank of ``tp_group``;
        with ``weights``, weights x loss, and 0 where a weight is 0.
    """
    check_logits(policy_logits, "policy_logits")
    check_like_policy(reference_logits, "reference_logits", policy_logits)
    kernels = _kernels(policy_logits, backend)
    check_shards_agree(policy_logits, tp_group)
    z, r = rows(policy_logits.detach()), rows(reference_logits.detach())
    w = weight_rows(weights, policy_logits)
    return per_token_loss(policy_logits, lambda need_grad: _reverse_kl_rows(
        z, r, tp_group, kernels, need_grad, w), w)


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
