"""What the losses on vocab-sharded logits share: softmax statistics and their cross-rank merge,
the row and shard checks, the choice of kernels (``backend``) and the hand-written gradient (as
megatron-core's ``tensor_parallel/cross_entropy.py`` keeps its own).

Layout: megatron-core's ``parallel_output=True``, each rank of the tensor-parallel group holding
a contiguous shard [..., V_local] of the vocabulary, the same V_local on every rank. A loss over
the full vocabulary is then a local pass (each row's softmax statistics), a tiny cross-rank merge
(``combine_softmax_stats``: one all-gather of a few floats per row), and a local pass (the row's
partial loss and the gradient shard), whose partial sums take one all-reduce.

The gradient is written during the forward pass (``per_token_loss``): autograd through a
cross-rank sum would need an all-reduce in its backward as well, which megatron-core's region
helpers lack, and the input shards then need not be kept for backward.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

try:
    from nemo_anchored import _C
except ImportError:  # not built: the torch kernels still work
    _C = None

# --------------------------------------------------------------------------------------------
# The tensor-parallel group.


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# torch >= 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[group size, *x.shape]: every rank's x, in rank order (x itself when unsharded)."""
    size = group_size(group)
    if size == 1:
        return x.unsqueeze(0)
    out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))  # gloo wants it flat in dim 0
    _all_gather_single(out, x.contiguous(), group=group)
    return out.view((size,) + tuple(x.shape))


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """x summed over the group's ranks, in place; returns x."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


# --------------------------------------------------------------------------------------------
# Softmax statistics over the full vocabulary.


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


def combine_softmax_stats(stats: torch.Tensor, tp_group) -> torch.Tensor:
    """Local (max, sum-exp) [rows, streams, 2] -> full-vocabulary (max, log sum-exp), same shape.

    One all-gather of the per-row statistics, then a log-sum-exp merge on every rank: the same
    float arithmetic everywhere, so every rank gets the same numbers bit for bit. The LSE stays
    split in two so log-probabilities can be formed as (x - max) - log_sum (see
    csrc/anchored_kl_math.h).
    """
    top, total, _ = _merge_softmax_stats(all_gather(stats, tp_group))
    return torch.stack([top, torch.log(total)], dim=-1)


def combine_softmax_stats_and_mean(stats: torch.Tensor, weighted: torch.Tensor, tp_group):
    """(``combine_softmax_stats(stats)``, E_p[f] [rows]) in one all-gather, p the softmax of
    stream 0 over the full vocabulary. ``weighted`` [rows]: this rank's sum of
    exp(x_v - max) f_v over its columns, relative to stream 0's local max (as its sum-exp is)."""
    rows, streams = stats.shape[:2]
    local = torch.cat([stats.reshape(rows, 2 * streams), weighted.reshape(rows, 1)], dim=-1)
    gathered = all_gather(local, tp_group)
    top, total, rescale = _merge_softmax_stats(gathered[..., :-1].reshape(-1, rows, streams, 2))
    mean = (gathered[..., -1] * rescale[..., 0]).sum(dim=0) / total[:, 0]
    return torch.stack([top, torch.log(total)], dim=-1), mean


def _merge_softmax_stats(gathered: torch.Tensor):
    """Every rank's (max, sum-exp) [ranks, rows, streams, 2] -> the full-vocabulary max (0 for a
    row with no finite column), sum of exp(x - max), and each rank's factor exp(max_k - max)."""
    maxes, sums = gathered[..., 0], gathered[..., 1]
    top = maxes.amax(dim=0)  # propagates NaN
    top_safe = torch.where(top == -math.inf, torch.zeros_like(top), top)
    rescale = torch.exp(maxes - top_safe)
    return top_safe, (sums * rescale).sum(dim=0), rescale


# (k - 1) / k! for k = 17 down to 2: the series of g below to float64 precision at |x| < 0.5.
_G_SERIES = [(k - 1) / math.factorial(k) for k in range(17, 1, -1)]


def g_small(x: torch.Tensor) -> torch.Tensor:
    """x e^x - e^x + 1 for |x| < 0.5 from its series sum_k (k-1)/k! x^k: nothing cancels."""
    acc = torch.full_like(x, _G_SERIES[0])
    for coefficient in _G_SERIES[1:]:
        acc = acc * x + coefficient
    return acc * x * x


# --------------------------------------------------------------------------------------------
# The choice of kernels: plain PyTorch (float64 too: the tests' reference) or the C++/CUDA
# extension nemo_anchored._C (fp32 accumulation for fp32, bf16 and fp16 logits).

BACKENDS = ("auto", "torch", "fused")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_available(device: torch.device | str = "cpu") -> bool:
    """Whether the extension is built with kernels for this device type."""
    device = torch.device(device)
    if _C is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _C.built_with_cuda())


def use_fused(logits: torch.Tensor, backend: str) -> bool:
    """Whether a call with ``backend`` runs the extension's kernels on ``logits``: "torch" never,
    "auto" when they are built for its device and dtype, "fused" always (ValueError or
    RuntimeError saying why not, rather than a silent fallback)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    fused_ok = fused_available(logits.device) and logits.dtype in FUSED_DTYPES
    if backend == "fused" and not fused_ok:
        if _C is None:
            raise RuntimeError("backend='fused': the nemo_anchored._C extension is not built "
                               "(run `make build` or `pip install --no-build-isolation -e .`)")
        if logits.dtype not in FUSED_DTYPES:
            raise ValueError(f"backend='fused' takes float32, bfloat16 or float16 logits, got "
                             f"{logits.dtype}; use backend='torch' for {logits.dtype}")
        raise RuntimeError(f"backend='fused': the nemo_anchored._C extension was built without "
                           f"kernels for device type {logits.device.type!r}")
    return fused_ok


# --------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument) and rows.


def check_logits(logits, name: str) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension, got shape "
                         f"{tuple(logits.shape)}")


def check_like_policy(other, name: str, policy: torch.Tensor) -> None:
    """``other`` (the argument ``name``) must match the policy logits' shape, dtype and device."""
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


_checked_shards: set = set()


def check_shards_agree(logits: torch.Tensor, tp_group) -> None:
    """Every rank of tp_group must hold the same number of rows and vocabulary columns.

    One tiny all-gather the first time a (group, shape) pair is seen; afterwards free.
    """
    if group_size(tp_group) == 1:
        return
    rows = logits.numel() // logits.shape[-1]
    key = (id(tp_group), rows, logits.shape[-1])
    if key in _checked_shards:
        return
    mine = torch.tensor([[rows, logits.shape[-1]]], dtype=torch.int64, device=logits.device)
    everyone = all_gather(mine, tp_group)[:, 0]
    if not bool((everyone == mine).all()):
        shapes = [tuple(s) for s in everyone.tolist()]
        raise ValueError(f"tp_group: the ranks disagree on the shard shape (rows, V_local): "
                         f"{shapes}; every rank must hold an equal vocabulary shard of the "
                         "same tokens")
    _checked_shards.add(key)


def rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """x as contiguous 2-D rows [rows, V_local], the kernels' layout (None stays None)."""
    return None if x is None else x.reshape(-1, x.shape[-1]).contiguous()


def weight_rows(weights, logits: torch.Tensor) -> torch.Tensor | None:
    """The per-token ``weights`` of a loss on ``logits`` as the kernels take them: [rows]
    contiguous float32 (float64 for float64 logits); None stays None. ValueError unless they are
    a floating-point tensor shaped like the loss on the logits' device."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise ValueError("weights must be a floating-point tensor")
    if weights.shape != logits.shape[:-1]:
        raise ValueError(f"weights has shape {tuple(weights.shape)}, the loss "
                         f"{tuple(logits.shape[:-1])}: they must match")
    if weights.device != logits.device:
        raise ValueError(f"weights is on {weights.device}, the logits on {logits.device}: they "
                         "must be on one device")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return weights.detach().reshape(-1).to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# The hand-written gradient.


_SCALE_CHUNK_ELEMENTS = 1 << 20


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad [rows, V] *= scale [rows] row by row, in place, in fp32 (float64 for float64 grad)
    rounded once to grad's dtype: the backward of a loss whose gradient its forward wrote."""
    scale_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    scale = scale.reshape(-1).to(scale_dtype)
    if (grad.device.type == "cpu" and _C is not None and scale_dtype == torch.float32
            and grad.is_contiguous()):
        # One pass over the gradient, where torch's in-place bf16/fp16 x fp32 multiply took
        # 30-40x as long (csrc/scale_rows_cpu.cpp).
        _C.scale_rows_(grad.view(-1, grad.shape[-1]), scale.contiguous())
        return
    scale = scale[:, None]
    if grad.device.type == "cpu" and grad.dtype != scale_dtype:
        # Without the extension: torch's in-place bf16/fp16 x fp32 multiply makes two fp32
        # copies of the whole gradient (measured: 500 MiB at 2048 x 32000): bound them by
        # chunks of rows.
        rows = max(1, _SCALE_CHUNK_ELEMENTS // max(1, grad.shape[-1]))
        for g, s in zip(grad.split(rows), scale.split(rows)):
            g.mul_(s)
    else:
        grad.mul_(scale)


def weigh_gradient(grad: torch.Tensor | None, weights: torch.Tensor | None):
    """grad [rows, V] with each row scaled by its weight and the rows of weight 0 set to 0,
    whatever they held: what the CPU kernels do as they write it, for the kernels that take no
    weights (the torch kernels, the CUDA ones). Returns grad (None stays None)."""
    if grad is None or weights is None:
        return grad
    scale_rows_(grad, weights)
    return grad.masked_fill_((weights == 0)[:, None], 0)


def native_weights(z: torch.Tensor, weights: torch.Tensor | None):
    """The weights to hand an extension kernel on z: its CPU kernels take them; its CUDA kernels
    take none (their memory access may change only once their suite has run on a GPU), so
    ``finish_gradient`` weighs their gradient after them."""
    return weights if z.device.type == "cpu" else None


def finish_gradient(grad, weights, native):
    """An extension kernel's gradient, weighted: as it came when the kernel took the weights
    (``native``, from ``native_weights``), weighed here otherwise. None (a call without the
    gradient: the bindings return an undefined tensor as None) stays None."""
    return grad if native is not None else weigh_gradient(grad, weights)


def weigh_loss(loss: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """weights x loss per row, and 0 for a row of weight 0 whatever its loss (NaN included)."""
    if weights is None:
        return loss
    return torch.where(weights == 0, torch.zeros_like(loss), loss * weights.to(loss.dtype))


class _HandWrittenGradient(torch.autograd.Function):
    """A per-token loss whose gradient w.r.t. the logits is written during the forward pass
    (by ``loss_and_grad(need_grad=True) -> (loss rows, gradient rows)``, the gradient already
    weighted by ``weights``)."""

    @staticmethod
    def forward(ctx, logits, loss_and_grad, weights):
        loss, grad = loss_and_grad(need_grad=True)
        ctx.save_for_backward(grad)
        ctx.logits_shape = logits.shape
        return weigh_loss(loss, weights).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # autograd runs backward so only under create_graph=True
            raise RuntimeError("the fused per-token losses have no second derivative: their "
                               "gradient is written in the forward pass, without a graph; "
                               "backward with create_graph=True is not supported")
        (grad,) = ctx.saved_tensors
        # In place: the buffer is ours, and a second backward is refused by autograd's version
        # check.
        scale_rows_(grad, grad_loss)
        return grad.view(ctx.logits_shape), None, None


def per_token_loss(logits, loss_and_grad, weights=None):
    """The loss shaped like logits.shape[:-1], differentiable when the logits require grad, and
    weighted by ``weights`` [rows] (``weigh_loss``; ``loss_and_grad`` weighs the gradient)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _HandWrittenGradient.apply(logits, loss_and_grad, weights)
    loss, _ = loss_and_grad(need_grad=False)
    return weigh_loss(loss, weights).view(logits.shape[:-1])
