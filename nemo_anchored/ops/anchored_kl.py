"""The anchored-KL loss on vocab-sharded logits, and its trust-region diagnostics.

Per token, with logits divided by the temperature and every softmax over the FULL vocabulary:

    logit mode:  q = softmax((1 - alpha) z_cur + alpha z_ref)
    prob mode:   q = (1 - alpha) softmax(z_cur) + alpha softmax(z_ref)
    loss = KL(q || softmax(z_policy)),   d loss / d z_policy = (p - q) / temperature

Each tensor-parallel rank holds a contiguous shard of the vocabulary (megatron-core's
``parallel_output=True`` layout). The evaluation is a local pass, a tiny cross-rank merge, a
local pass (see ../shared/design/anchored_learning.md):

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

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

INTERPOLATIONS = {"logit": 0, "prob": 1}
BACKENDS = ("auto", "torch", "fused")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    from nemo_anchored import _C
except ImportError:  # not built: the torch backend still works
    _C = None


def num_streams(mode: int) -> int:
    """Softmax streams per row: logit mode [policy, anchor]; prob mode [policy, current, ref]."""
    return 2 if mode == INTERPOLATIONS["logit"] else 3


# --------------------------------------------------------------------------------------------
# Step 2: the cross-rank merge, shared by both kernel sets.


def combine_softmax_stats(stats: torch.Tensor, tp_group) -> torch.Tensor:
    """Local (max, sum-exp) [rows, streams, 2] -> full-vocabulary (max, log sum-exp), same shape.

    One all-gather of the per-row statistics, then a log-sum-exp merge on every rank: the same
    float arithmetic everywhere, so every rank gets the same numbers bit for bit. The LSE stays
    split in two so log-probabilities can be formed as (x - max) - log_sum (see
    csrc/anchored_kl_math.h).
    """
    gathered = _all_gather(stats, tp_group)
    maxes, sums = gathered[..., 0], gathered[..., 1]
    top = maxes.amax(dim=0)  # propagates NaN
    top_safe = torch.where(top == -math.inf, torch.zeros_like(top), top)
    total = (sums * torch.exp(maxes - top_safe)).sum(dim=0)
    return torch.stack([top_safe, torch.log(total)], dim=-1)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


# torch >= 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[group size, *x.shape]: every rank's x, in rank order (x itself when unsharded)."""
    size = _group_size(group)
    if size == 1:
        return x.unsqueeze(0)
    out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))  # gloo wants it flat in dim 0
    _all_gather_single(out, x.contiguous(), group=group)
    return out.view((size,) + tuple(x.shape))


# --------------------------------------------------------------------------------------------
# Steps 1 and 3: two kernel sets with the same signatures.
# z, c, r are 2-D [rows, V_local]; c is None in live mode (current = policy).


def softmax_stats(*streams: torch.Tensor) -> torch.Tensor:
    """Local (max, sum of exp(x - max)) per row of each [rows, V_local] stream: [rows, n, 2],
    in float32 (float64 for float64 streams). A row of -inf gives (-inf, 0)."""
    stats = []
    for x in streams:
        top = x.amax(dim=-1, keepdim=True)  # propagates NaN
        top_safe = torch.where(top == -math.inf, torch.zeros_like(top), top)
        stats.append(torch.cat([top, torch.exp(x - top_safe).sum(-1, keepdim=True)], -1))
    out = torch.stack(stats, dim=1)
    return out if out.dtype == torch.float64 else out.float()


class TorchKernels:
    """Plain PyTorch. Computes in float32, or float64 for float64 inputs (the reference)."""

    name = "torch"

    @staticmethod
    def _scaled(x: torch.Tensor, inv_tau: float) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.to(dtype) * inv_tau

    @staticmethod
    def _anchor(c, r, alpha):
        return r if alpha == 1.0 else c if alpha == 0.0 else (1 - alpha) * c + alpha * r

    def row_stats(self, z, c, r, alpha, inv_tau, mode):
        z = self._scaled(z, inv_tau)
        c = z if c is None else self._scaled(c, inv_tau)
        r = self._scaled(r, inv_tau)
        return softmax_stats(*([z, self._anchor(c, r, alpha)] if mode == 0 else [z, c, r]))

    def kl_grad(self, z_in, c, r, lse, alpha, inv_tau, mode, need_grad):
        # Mirrors column_element in csrc/anchored_kl_math.h, whose comments explain the forms.
        z = self._scaled(z_in, inv_tau)
        c = z if c is None else self._scaled(c, inv_tau)
        r = self._scaled(r, inv_tau)
        top, log_sum = lse.to(z.dtype).unbind(-1)  # each [rows, streams]

        def log_softmax_at(x, k):
            return (x - top[:, k, None]) - log_sum[:, k, None]

        def lse_difference(i, j):
            return (top[:, i, None] - top[:, j, None]) + (log_sum[:, i, None] - log_sum[:, j, None])

        lp = log_softmax_at(z, 0)
        if mode == 0:
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
        term = torch.where(small, p * _g_small(xs), torch.where(q == 0, p, q * x - q + p))
        partial = term.sum(dim=-1)
        grad = None
        if need_grad:
            p_minus_q = torch.where(small, -p * torch.expm1(xs), p - q)
            grad = (p_minus_q * inv_tau).to(z_in.dtype)
        return partial, grad


# (k - 1) / k! for k = 17 down to 2: the series of g below to float64 precision at |x| < 0.5.
_G_SERIES = [(k - 1) / math.factorial(k) for k in range(17, 1, -1)]


def _g_small(x):
    """x e^x - e^x + 1 for |x| < 0.5 from its series sum_k (k-1)/k! x^k: nothing cancels."""
    acc = torch.full_like(x, _G_SERIES[0])
    for coefficient in _G_SERIES[1:]:
        acc = acc * x + coefficient
    return acc * x * x


class FusedKernels:
    """The C++/CUDA extension (nemo_anchored._C)."""

    name = "fused"

    @staticmethod
    def row_stats(z, c, r, alpha, inv_tau, mode):
        return _C.row_stats(z, c, r, alpha, inv_tau, mode)

    @staticmethod
    def kl_grad(z, c, r, lse, alpha, inv_tau, mode, need_grad):
        partial, grad = _C.kl_grad(z, c, r, lse, alpha, inv_tau, mode, need_grad)
        return partial, (grad if need_grad else None)

    @staticmethod
    def unsharded(z, c, r, alpha, inv_tau, mode, need_grad):
        kl, grad = _C.fused(z, c, r, alpha, inv_tau, mode, need_grad)
        return kl, (grad if need_grad else None)


def fused_available(device: torch.device | str = "cpu") -> bool:
    """Whether the extension is built with kernels for this device type."""
    device = torch.device(device)
    if _C is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _C.built_with_cuda())


def _kl_rows(z, c, r, alpha, mode, inv_tau, tp_group, kernels, need_grad):
    """Per-row KL over the full vocabulary (same on every rank) and the local gradient shard."""
    if _group_size(tp_group) == 1 and hasattr(kernels, "unsharded"):
        return kernels.unsharded(z, c, r, alpha, inv_tau, mode, need_grad)
    stats = kernels.row_stats(z, c, r, alpha, inv_tau, mode)
    lse = combine_softmax_stats(stats, tp_group)
    partial, grad = kernels.kl_grad(z, c, r, lse, alpha, inv_tau, mode, need_grad)
    if _group_size(tp_group) > 1:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=tp_group)
    return partial, grad


# --------------------------------------------------------------------------------------------
# Argument checking.


@dataclass(frozen=True)
class _Call:
    alpha: float
    mode: int
    inv_tau: float
    tp_group: object
    kernels: object


_checked_shards: set = set()


def _check_arguments(policy, reference, current, alpha, interpolation, temperature, tp_group,
                     backend) -> _Call:
    if not isinstance(policy, torch.Tensor) or not policy.is_floating_point():
        raise ValueError("policy_logits must be a floating-point tensor")
    if policy.dim() < 1 or policy.shape[-1] == 0:
        raise ValueError(f"policy_logits must have a non-empty vocabulary dimension, got "
                         f"shape {tuple(policy.shape)}")
    for name, other in (("reference_logits", reference), ("current_logits", current)):
        if other is None and name == "current_logits":
            continue
        if not isinstance(other, torch.Tensor):
            raise ValueError(f"{name} must be a tensor")
        if other.shape != policy.shape:
            raise ValueError(f"{name} has shape {tuple(other.shape)}, policy_logits "
                             f"{tuple(policy.shape)}: they must match")
        if other.dtype != policy.dtype:
            raise ValueError(f"{name} has dtype {other.dtype}, policy_logits {policy.dtype}: "
                             "they must match")
        if other.device != policy.device:
            raise ValueError(f"{name} is on {other.device}, policy_logits on {policy.device}: "
                             "they must be on one device")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, "
                         f"got {interpolation!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kernels = _choose_kernels(policy, backend)
    if _group_size(tp_group) > 1:
        _check_shards_agree(policy, tp_group)
    return _Call(float(alpha), INTERPOLATIONS[interpolation], 1.0 / float(temperature),
                 tp_group, kernels)


def _choose_kernels(policy, backend):
    if backend == "torch":
        return TorchKernels()
    fused_ok = fused_available(policy.device) and policy.dtype in _FUSED_DTYPES
    if backend == "fused" and not fused_ok:
        if _C is None:
            raise RuntimeError("backend='fused': the nemo_anchored._C extension is not built "
                               "(run `make build` or `pip install --no-build-isolation -e .`)")
        if policy.dtype not in _FUSED_DTYPES:
            raise ValueError(f"backend='fused' takes float32, bfloat16 or float16 logits, got "
                             f"{policy.dtype}; use backend='torch' for {policy.dtype}")
        raise RuntimeError(f"backend='fused': the nemo_anchored._C extension was built without "
                           f"kernels for device type {policy.device.type!r}")
    return FusedKernels() if fused_ok else TorchKernels()


def _check_shards_agree(policy, tp_group):
    """Every rank of tp_group must hold the same number of rows and vocabulary columns.

    One tiny all-gather the first time a (group, shape) pair is seen; afterwards free.
    """
    rows = policy.numel() // policy.shape[-1]
    key = (id(tp_group), rows, policy.shape[-1])
    if key in _checked_shards:
        return
    mine = torch.tensor([[rows, policy.shape[-1]]], dtype=torch.int64, device=policy.device)
    everyone = _all_gather(mine, tp_group)[:, 0]
    if not bool((everyone == mine).all()):
        shapes = [tuple(s) for s in everyone.tolist()]
        raise ValueError(f"tp_group: the ranks disagree on the shard shape (rows, V_local): "
                         f"{shapes}; every rank must hold an equal vocabulary shard of the "
                         "same tokens")
    _checked_shards.add(key)


def _rows(x):
    return None if x is None else x.reshape(-1, x.shape[-1]).contiguous()


# --------------------------------------------------------------------------------------------
# Public API.


class _HandWrittenGradient(torch.autograd.Function):
    """A per-token loss whose gradient w.r.t. the logits is written during the forward pass
    (by ``loss_and_grad(need_grad=True) -> (loss rows, gradient rows)``)."""

    @staticmethod
    def forward(ctx, logits, loss_and_grad):
        loss, grad = loss_and_grad(need_grad=True)
        ctx.save_for_backward(grad)
        ctx.logits_shape = logits.shape
        return loss.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # In place: the buffer is ours, and a second backward is refused by autograd's version
        # check. Multiplying by the fp32 scale rounds once to the logits' dtype.
        scale_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        grad.mul_(grad_loss.reshape(-1, 1).to(scale_dtype))
        return grad.view(ctx.logits_shape), None


def per_token_loss(logits, loss_and_grad):
    """The loss shaped like logits.shape[:-1], differentiable when the logits require grad."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _HandWrittenGradient.apply(logits, loss_and_grad)
    loss, _ = loss_and_grad(need_grad=False)
    return loss.view(logits.shape[:-1])


def anchored_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, *,
                current_logits: torch.Tensor | None = None, alpha: float = 0.5,
                interpolation: str = "logit", temperature: float = 1.0, tp_group=None,
                backend: str = "auto") -> torch.Tensor:
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

    Returns:
        fp32 per-token loss (fp64 for fp64 inputs), identical on every rank of ``tp_group``.
        Mask and average it in the caller, e.g. ``(loss * mask).sum() / mask.sum()``.
    """
    call = _check_arguments(policy_logits, reference_logits, current_logits, alpha,
                            interpolation, temperature, tp_group, backend)
    reference_logits = reference_logits.detach()
    current_logits = None if current_logits is None else current_logits.detach()
    return per_token_loss(policy_logits, lambda need_grad: _kl_rows(
        _rows(policy_logits), _rows(current_logits), _rows(reference_logits), call.alpha,
        call.mode, call.inv_tau, tp_group, call.kernels, need_grad=need_grad))


@torch.no_grad()
def anchor_diagnostics(policy_logits: torch.Tensor, reference_logits: torch.Tensor, *,
                       current_logits: torch.Tensor | None = None, alpha: float = 0.5,
                       interpolation: str = "logit", temperature: float = 1.0, tp_group=None,
                       backend: str = "auto") -> dict[str, torch.Tensor]:
    """Per-token trust-region diagnostics of one anchored step (no gradient).

    Returns a dict of fp32 tensors shaped like the loss:
        anchor_step_kl: KL(q || p_cur), how far the anchor sits from the current model;
        bound: its guaranteed ceiling: alpha * KL(p_ref || p_cur) (prob, Lemma 5.1) or
            alpha / (1 - alpha) * KL(p_cur || p_ref) (logit, Lemma 5.3; inf at alpha = 1);
        kl_cur_ref: KL(p_cur || p_ref);
        entropy: the policy's entropy.
    """
    call = _check_arguments(policy_logits, reference_logits, current_logits, alpha,
                            interpolation, temperature, tp_group, backend)
    shape = policy_logits.shape[:-1]
    z, r = _rows(policy_logits), _rows(reference_logits)
    c = z if current_logits is None else _rows(current_logits)
    logit = INTERPOLATIONS["logit"]

    def kl_rows(target_policy, anchor_current, alpha_, mode):
        # KL(q || p_target) with q built from (anchor_current, r): live mode semantics when the
        # two are the same tensor. alpha_ = 0 in logit mode gives q = p_cur, alpha_ = 1 q = p_ref.
        current = None if anchor_current is target_policy else anchor_current
        kl, _ = _kl_rows(target_policy, current, r, alpha_, mode, call.inv_tau, tp_group,
                         call.kernels, need_grad=False)
        return kl.view(shape).float()

    step = kl_rows(c, c, call.alpha, call.mode)
    kl_cur_ref = kl_rows(r, c, 0.0, logit)
    if call.mode == logit:
        ratio = call.alpha / (1.0 - call.alpha) if call.alpha < 1.0 else math.inf
        bound = ratio * kl_cur_ref
    else:
        bound = call.alpha * kl_rows(c, c, 1.0, logit)
    return {"anchor_step_kl": step, "bound": bound, "kl_cur_ref": kl_cur_ref,
            "entropy": _entropy(z, call.inv_tau, tp_group).view(shape)}


def _entropy(z, inv_tau, tp_group):
    """H(p) = LSE(z) - sum_v p_v z_v, with the LSE over the full vocabulary."""
    zs = z.float() * inv_tau
    top, log_sum = combine_softmax_stats(softmax_stats(zs), tp_group).unbind(-1)
    p = torch.exp((zs - top) - log_sum)
    partial = torch.where(p > 0, p * (zs - top), torch.zeros_like(p)).sum(-1)
    if _group_size(tp_group) > 1:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=tp_group)
    return (log_sum[:, 0] - partial).float()
