"""The anchored-KL loss on vocab-sharded logits, and its trust-region diagnostics.

Per token, with logits divided by the temperature and every softmax over the FULL vocabulary:

    logit mode:  q = softmax((1 - alpha) z_cur + alpha z_ref)
    prob mode:   q = (1 - alpha) softmax(z_cur) + alpha softmax(z_ref)
    loss = KL(q || softmax(z_policy)),   d loss / d z_policy = (p - q) / temperature

Each tensor-parallel rank holds a contiguous shard of the vocabulary (megatron-core's
``parallel_output=True`` layout). The evaluation is a local pass, a tiny cross-rank merge, a
local pass (vocab_parallel.py; the derivation: docs/design/sharded_loss.md):

1. ``row_stats``: per row and stream, the local max and sum of exp(x - max);
2. ``combine_softmax_stats``: one all-gather of those few floats per row, merged into the
   full-vocabulary log-sum-exp of each stream;
3. ``kl_grad``: per rank, the row's partial KL and the gradient shard p - q, then one
   all-reduce (sum) of the partial KLs.

The gradient is written during the forward pass, so the three input shards need not be kept
for backward, which only scales it by the incoming gradient. Two interchangeable kernel sets
implement steps 1 and 3: ``TorchKernels`` (plain PyTorch; float64 inputs stay float64) and
``FusedKernels`` (the C++/CUDA extension, fp32 accumulation for any input dtype).

Non-finite inputs: -inf marks a column with no mass (padded vocabulary) and is exact. A NaN or
+inf anywhere in a row makes that row's loss NaN (and its gradient NaN); nothing is raised
here, because checking would cost a device sync per call: the trainer checks the loss.
"""
from __future__ import annotations

import dataclasses
import enum
import math

import torch

from nemo_anchored.ops.vocab_parallel import (all_reduce_sum, check_like_policy, check_logits,
                                              check_shards_agree, combine_softmax_stats,
                                              finish_gradient, g_small, group_size,
                                              native_weights, per_token_loss, rows,
                                              softmax_stats, use_fused, weigh_gradient,
                                              weight_rows)

try:
    from nemo_anchored import _C
except ImportError:  # not built: the torch backend still works
    _C = None


class Interpolation(enum.IntEnum):
    """How q mixes the current model and the reference; the values are csrc's ``Interp``."""

    LOGIT = 0
    PROB = 1


_INTERPOLATIONS = {mode.name.lower(): mode for mode in Interpolation}  # the public names


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    """Everything the kernels take besides the logits, validated once."""

    alpha: float  # q's weight toward the reference: in (0, 1]; 0 in the diagnostics (q = p_cur)
    interpolation: Interpolation
    inv_tau: float  # 1 / temperature

    @classmethod
    def validated(cls, alpha, interpolation, temperature) -> AnchorSpec:
        """From the public arguments; ValueError naming the one out of range."""
        if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                or not 0.0 < alpha <= 1.0):
            raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        return cls(float(alpha), _INTERPOLATIONS[interpolation], 1.0 / float(temperature))


# --------------------------------------------------------------------------------------------
# Steps 1 and 3: two kernel sets with the same signatures.
# z, c, r are 2-D [rows, V_local]; c is None in live mode (current = policy). weights: the
# loss's per-row weights or None; the gradient comes back weighted (vocab_parallel's
# weigh_gradient), and a row of weight 0 may be skipped: its loss and statistics are then 0.


class TorchKernels:
    """Plain PyTorch. Computes in float32, or float64 for float64 inputs (the reference)."""

    @staticmethod
    def _scaled(x: torch.Tensor, inv_tau: float) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.to(dtype) * inv_tau

    @staticmethod
    def _anchor(c, r, alpha):
        return r if alpha == 1.0 else c if alpha == 0.0 else (1 - alpha) * c + alpha * r

    def row_stats(self, z, c, r, spec: AnchorSpec, weights):
        z = self._scaled(z, spec.inv_tau)
        c = z if c is None else self._scaled(c, spec.inv_tau)
        r = self._scaled(r, spec.inv_tau)
        if spec.interpolation == Interpolation.LOGIT:
            return softmax_stats(z, self._anchor(c, r, spec.alpha))
        return softmax_stats(z, c, r)

    def kl_grad(self, z_in, c, r, spec: AnchorSpec, lse, need_grad, weights):
        # Mirrors column_element in csrc/anchored_kl_math.h, whose comments explain the forms.
        alpha, inv_tau = spec.alpha, spec.inv_tau
        z = self._scaled(z_in, inv_tau)
        c = z if c is None else self._scaled(c, inv_tau)
        r = self._scaled(r, inv_tau)
        top, log_sum = lse.to(z.dtype).unbind(-1)  # each [rows, streams]

        def log_softmax_at(x, k):
            return (x - top[:, k, None]) - log_sum[:, k, None]

        def lse_difference(i, j):
            return (top[:, i, None] - top[:, j, None]) + (log_sum[:, i, None] - log_sum[:, j, None])

        lp = log_softmax_at(z, 0)
        if spec.interpolation == Interpolation.LOGIT:
            lq = log_softmax_at(self._anchor(c, r, alpha), 1)
            x = (1 - alpha) * (c - z) + alpha * (r - z) - lse_difference(1, 0)
        else:
            log_one_minus_alpha = math.log1p(-alpha) if alpha < 1 else -math.inf
            log_alpha = math.log(alpha) if alpha > 0 else -math.inf
            lq = torch.logaddexp(log_one_minus_alpha + log_softmax_at(c, 1),
                                 log_alpha + log_softmax_at(r, 2))
            x = torch.logaddexp(log_one_minus_alpha + (c - z) + lse_difference(0, 1),
                                log_alpha + (r - z) + lse_difference(0, 2))
        p, q = torch.exp(lp), torch.exp(lq)
        x = torch.where(torch.isfinite(x), x, lq - lp)
        small = x.abs() < 0.5
        xs = torch.where(small, x, torch.zeros_like(x))
        term = torch.where(small, p * g_small(xs), torch.where(q == 0, p, q * x - q + p))
        partial = term.sum(dim=-1)
        grad = None
        if need_grad:
            p_minus_q = torch.where(small, -p * torch.expm1(xs), p - q)
            grad = weigh_gradient((p_minus_q * inv_tau).to(z_in.dtype), weights)
        return partial, grad


class FusedKernels:
    """The C++/CUDA extension (nemo_anchored._C). Its bindings take the spec as
    (alpha, inv_tau, mode), the order of csrc's ``Inputs``, after the tensors; the CPU kernels
    take the weights (``native_weights``)."""

    @staticmethod
    def row_stats(z, c, r, spec: AnchorSpec, weights):
        return _C.row_stats(z, c, r, spec.alpha, spec.inv_tau, int(spec.interpolation),
                            native_weights(z, weights))

    @staticmethod
    def kl_grad(z, c, r, spec: AnchorSpec, lse, need_grad, weights):
        native = native_weights(z, weights)
        partial, grad = _C.kl_grad(z, c, r, lse, spec.alpha, spec.inv_tau,
                                   int(spec.interpolation), need_grad, native)
        return partial, finish_gradient(grad, weights, native)

    @staticmethod
    def unsharded(z, c, r, spec: AnchorSpec, need_grad, weights):
        native = native_weights(z, weights)
        kl, grad = _C.fused(z, c, r, spec.alpha, spec.inv_tau, int(spec.interpolation),
                            need_grad, native)
        return kl, finish_gradient(grad, weights, native)


def _kl_rows(z, c, r, spec: AnchorSpec, tp_group, kernels, need_grad, weights=None):
    """Per-row KL over the full vocabulary (same on every rank) and the local gradient shard,
    weighted by ``weights`` (the KL is not)."""
    if group_size(tp_group) == 1 and hasattr(kernels, "unsharded"):
        return kernels.unsharded(z, c, r, spec, need_grad, weights)
    lse = combine_softmax_stats(kernels.row_stats(z, c, r, spec, weights), tp_group)
    partial, grad = kernels.kl_grad(z, c, r, spec, lse, need_grad, weights)
    return all_reduce_sum(partial, tp_group), grad


# --------------------------------------------------------------------------------------------
# The diagnostics: KLs between the three models from one set of softmax statistics.


def _model_lse(z, c, r, spec: AnchorSpec, tp_group, kernels, weights):
    """Full-vocabulary (max, log_sum) [rows, 3, 2] of the policy, current (the policy again in
    live mode) and reference logits: prob mode's statistics, in which alpha plays no part."""
    three_models = dataclasses.replace(spec, interpolation=Interpolation.PROB)
    return combine_softmax_stats(kernels.row_stats(z, c, r, three_models, weights), tp_group)


def _local_kl(source, target, lse, spec: AnchorSpec, kernels, weights):
    """This rank's share of KL(p_source || p_target) per row, lse = [target, source] pairs: the
    anchored KL in logit mode at alpha = 0, where q is the current slot's softmax (the
    reference slot, unused then, repeats the target)."""
    q_is_current = AnchorSpec(0.0, Interpolation.LOGIT, spec.inv_tau)
    partial, _ = kernels.kl_grad(target, source, target, q_is_current, lse, False, weights)
    return partial


def _local_entropy_term(z, lse, spec: AnchorSpec):
    """This rank's share of sum_v p_v (z_v - max) per row; H(p) = log_sum - its total.
    lse: the policy's (max, log_sum) [rows, 2]."""
    top, log_sum = lse[:, None, 0], lse[:, None, 1]
    zs = z.to(lse.dtype) * spec.inv_tau
    p = torch.exp((zs - top) - log_sum)
    return torch.where(p > 0, p * (zs - top), torch.zeros_like(p)).sum(-1)


def _diagnostic_rows(z, c, r, step, spec: AnchorSpec, tp_group, kernels, *, policy_ref: bool,
                     weights=None):
    """anchor_diagnostics' values per row (fp32), given the anchor step KL(q || p_cur) [rows];
    with policy_ref also ``kl_policy_ref`` = KL(p_theta || p_ref); 0 at the rows of weight 0,
    which the kernels may skip."""
    lse = _model_lse(z, c, r, spec, tp_group, kernels, weights)
    policy, current, reference = 0, 1, 2
    models = {policy: z, current: z if c is None else c, reference: r}

    def local_kl(source, target):
        return _local_kl(models[source], models[target], lse[:, [target, source]], spec, kernels,
                         weights)

    # Every row's local shares, summed over the ranks in one all-reduce.
    shares = {"kl_cur_ref": local_kl(current, reference),
              "entropy": _local_entropy_term(z, lse[:, policy], spec)}
    if spec.interpolation == Interpolation.PROB:
        shares["kl_ref_cur"] = local_kl(reference, current)
    if policy_ref and c is not None:  # in live mode, KL(p_theta || p_ref) is kl_cur_ref
        shares["kl_policy_ref"] = local_kl(policy, reference)
    totals = all_reduce_sum(torch.stack(list(shares.values()), dim=-1), tp_group)
    total = dict(zip(shares, totals.unbind(-1)))

    kl_cur_ref = total["kl_cur_ref"].float()
    if spec.interpolation == Interpolation.LOGIT:
        alpha = spec.alpha
        if alpha < 1.0:
            bound = alpha / (1.0 - alpha) * kl_cur_ref
        else:  # inf, but 0 where the current model is the reference (not inf x 0 = NaN)
            bound = torch.where(kl_cur_ref == 0, 0.0, math.inf * kl_cur_ref)
    else:
        bound = spec.alpha * total["kl_ref_cur"].float()
    out = {"anchor_step_kl": step.float(), "bound": bound, "kl_cur_ref": kl_cur_ref,
           "entropy": (lse[:, policy, 1] - total["entropy"]).float()}
    if policy_ref:
        out["kl_policy_ref"] = total["kl_policy_ref"].float() if c is not None else kl_cur_ref
    if weights is not None:
        out = {key: torch.where(weights == 0, torch.zeros_like(value), value)
               for key, value in out.items()}
    return out


# --------------------------------------------------------------------------------------------
# Argument checking.


def _check_arguments(policy, reference, current, alpha, interpolation, temperature, tp_group,
                     backend):
    """(spec, kernels) of a call, after checking every argument."""
    check_logits(policy, "policy_logits")
    check_like_policy(reference, "reference_logits", policy)
    if current is not None:
        check_like_policy(current, "current_logits", policy)
    spec = AnchorSpec.validated(alpha, interpolation, temperature)
    kernels = FusedKernels() if use_fused(policy, backend) else TorchKernels()
    check_shards_agree(policy, tp_group)
    return spec, kernels


def _detached_rows(policy, current, reference):
    """(z, c, r): the inputs as the kernels take them, c None in live mode."""
    return (rows(policy.detach()), None if current is None else rows(current.detach()),
            rows(reference.detach()))


# --------------------------------------------------------------------------------------------
# Public API.


def anchored_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, *,
                current_logits: torch.Tensor | None = None, alpha: float = 0.5,
                interpolation: str = "logit", temperature: float = 1.0, tp_group=None,
                backend: str = "auto", weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(q || p_theta) over the full vocabulary, shape ``policy_logits.shape[:-1]``.

    Args:
        policy_logits: [..., V_local] fp32, bf16 or fp16 (fp64 with the torch backend); the
            only differentiable input: the gradient is (p - q) / temperature times the incoming
            gradient, in the policy logits' dtype.
        reference_logits: the frozen SFT model's logits, same shape, dtype and device.
        current_logits: the snapshot's logits (snapshot mode), or None for live mode
            (current = policy logits, detached).
        alpha: interpolation weight toward the reference, in (0, 1].
        interpolation: "logit" (geometric mean) or "prob" (arithmetic mixture).
        temperature: divides all logits.
        tp_group: the process group over which the last dimension is sharded (None: unsharded).
        backend: "torch", "fused" or "auto" (fused when built for the device and dtype).
        weights: per-token weights shaped like the loss (the loss mask, or the mask divided by
            the token count for a mean), the same on every rank, constants (no gradient flows
            to them); see the Returns.

    Returns:
        fp32 per-token loss (fp64 for fp64 inputs), identical on every rank of ``tp_group``;
        with ``weights``, weights x loss, and 0 where a weight is 0 (NaN logits included).
        Mask and reduce it in the caller, e.g. ``(loss * mask).sum() / mask.sum()``, or pass
        the mask as ``weights`` and take ``loss.sum()``: the CPU kernels then skip the tokens
        of weight 0 without reading them and write the gradient already weighted, so the
        backward, given 1 per token by the sum, has nothing left to do (on the CUDA kernels the
        gradient is weighted in a pass after them, as the backward would otherwise do).
    """
    spec, kernels = _check_arguments(policy_logits, reference_logits, current_logits, alpha,
                                     interpolation, temperature, tp_group, backend)
    z, c, r = _detached_rows(policy_logits, current_logits, reference_logits)
    w = weight_rows(weights, policy_logits)
    return per_token_loss(policy_logits, lambda need_grad: _kl_rows(
        z, c, r, spec, tp_group, kernels, need_grad, w), w)


@torch.no_grad()
def anchor_diagnostics(policy_logits: torch.Tensor, reference_logits: torch.Tensor, *,
                       current_logits: torch.Tensor | None = None, alpha: float = 0.5,
                       interpolation: str = "logit", temperature: float = 1.0, tp_group=None,
                       backend: str = "auto") -> dict[str, torch.Tensor]:
    """Per-token trust-region diagnostics of one anchored step (no gradient).

    Returns a dict of fp32 tensors shaped like the loss:
        anchor_step_kl: KL(q || p_cur), how far the anchor sits from the current model;
        bound: its guaranteed ceiling: alpha * KL(p_ref || p_cur) (prob, Lemma 5.1) or
            alpha / (1 - alpha) * KL(p_cur || p_ref) (logit, Lemma 5.3; inf at alpha = 1,
            but 0 where p_cur = p_ref);
        kl_cur_ref: KL(p_cur || p_ref);
        entropy: the policy's entropy.
    """
    spec, kernels = _check_arguments(policy_logits, reference_logits, current_logits, alpha,
                                     interpolation, temperature, tp_group, backend)
    z, c, r = _detached_rows(policy_logits, current_logits, reference_logits)
    step, _ = _kl_rows(z if c is None else c, None, r, spec, tp_group, kernels, need_grad=False)
    d = _diagnostic_rows(z, c, r, step, spec, tp_group, kernels, policy_ref=False)
    return {key: value.view(policy_logits.shape[:-1]) for key, value in d.items()}


def anchored_kl_and_diagnostics(policy_logits: torch.Tensor, reference_logits: torch.Tensor, *,
                                current_logits: torch.Tensor | None = None, alpha: float = 0.5,
                                interpolation: str = "logit", temperature: float = 1.0,
                                tp_group=None, backend: str = "auto",
                                weights: torch.Tensor | None = None):
    """(anchored_kl(...), anchor_diagnostics(...) plus ``kl_policy_ref`` = KL(p_theta || p_ref))
    with the same arguments, for a step that logs both, computing nothing twice: in live mode
    the anchor step KL(q || p_cur) is the loss itself and KL(p_cur || p_ref) is
    KL(p_theta || p_ref). With ``weights``, the loss is weighted as anchored_kl's and the
    diagnostics are not, but are 0 at the tokens of weight 0, which the kernels may skip."""
    spec, kernels = _check_arguments(policy_logits, reference_logits, current_logits, alpha,
                                     interpolation, temperature, tp_group, backend)
    z, c, r = _detached_rows(policy_logits, current_logits, reference_logits)
    w = weight_rows(weights, policy_logits)
    unweighted = []  # the loss rows before weigh_loss: live mode's anchor step

    def loss_and_grad(need_grad):
        kl, grad = _kl_rows(z, c, r, spec, tp_group, kernels, need_grad, w)
        unweighted.append(kl.detach())
        return kl, grad

    loss = per_token_loss(policy_logits, loss_and_grad, w)
    with torch.no_grad():
        if c is None:
            step = unweighted[0]
        else:
            step, _ = _kl_rows(c, None, r, spec, tp_group, kernels, False, w)
        d = _diagnostic_rows(z, c, r, step, spec, tp_group, kernels, policy_ref=True, weights=w)
    return loss, {key: value.view(loss.shape) for key, value in d.items()}
