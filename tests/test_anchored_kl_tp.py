"""anchored_kl on vocab-sharded logits across gloo processes: TP = 2 and 4 against float64
full-vocabulary math.

One spawn of 4 ranks (process start-up dominates the cost) holds every check: the ranks form
two TP = 2 groups and one TP = 4 group. Each rank draws the same full-vocabulary tensors,
keeps its contiguous shard, and compares the loss (all ranks) and its gradient shard with
tests.reference.
"""
import itertools
import math

import pytest
import torch
import torch.distributed as dist

from tests.launch import spawn_tp_ranks

pytestmark = pytest.mark.slow  # spawned gloo ranks

WORLD = 4
V_FULL = 4 * 251  # shards of 502 (TP = 2) and 251 (TP = 4): not powers of two
PADDED = 13  # trailing padded (-inf) columns of the full vocabulary: inside the last shard


def full_logits(seed, dtype, rows=(3, 5), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, V_FULL, generator=g, dtype=torch.float64) * scale
    x[..., V_FULL - PADDED:] = -math.inf
    return x.to(dtype)


def shard(x, index, size):
    width = x.shape[-1] // size
    return x[..., index * width:(index + 1) * width].contiguous()


def check_case(group, index, size, backend, interpolation, mode, dtype, temperature, seed):
    from nemo_anchored.ops import anchor_diagnostics, anchored_kl
    from nemo_anchored.ops.anchored_kl import anchored_kl_and_diagnostics
    from tests.reference import (anchored_kl_reference, kl, max_row_relative_error,
                                 relative_error)

    z, r = full_logits(seed, dtype), full_logits(seed + 1, dtype)
    c = full_logits(seed + 2, dtype) if mode == "snapshot" else None
    weights = torch.rand(z.shape[:-1], generator=torch.Generator().manual_seed(seed + 3))
    ref_loss, ref_grad = anchored_kl_reference(z, r, c, 0.4, interpolation, temperature)

    z_local = shard(z, index, size).requires_grad_()
    c_local = None if c is None else shard(c, index, size)
    loss = anchored_kl(z_local, shard(r, index, size), current_logits=c_local, alpha=0.4,
                       interpolation=interpolation, temperature=temperature, tp_group=group,
                       backend=backend)
    (loss * weights).sum().backward()
    expected_grad = shard(ref_grad * weights[..., None].double(), index, size)
    loss_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, 1e-2)
    label = (size, backend, interpolation, mode, dtype, temperature)
    assert max_row_relative_error(loss.detach(), ref_loss) <= loss_tol, label
    assert relative_error(z_local.grad, expected_grad) <= grad_tol, label
    assert z_local.grad.dtype == dtype

    # Every rank of the group must hold the very same loss.
    everyone = [torch.empty_like(loss) for _ in range(size)]
    dist.all_gather(everyone, loss.detach().contiguous(), group=group)
    assert all(torch.equal(everyone[0], other) for other in everyone), label

    if dtype == torch.float32 and temperature == 1.0:
        d = anchor_diagnostics(shard(z, index, size), shard(r, index, size),
                               current_logits=c_local, alpha=0.4,
                               interpolation=interpolation, tp_group=group, backend=backend)
        full = anchor_diagnostics(z, r, current_logits=c, alpha=0.4,
                                  interpolation=interpolation, backend="torch")
        for key in ("anchor_step_kl", "bound", "kl_cur_ref", "entropy"):
            assert max_row_relative_error(d[key], full[key]) <= 1e-5, (key,) + label
        assert (d["anchor_step_kl"] <= d["bound"] * (1 + 1e-5)).all()

        both_loss, both = anchored_kl_and_diagnostics(
            shard(z, index, size), shard(r, index, size), current_logits=c_local, alpha=0.4,
            interpolation=interpolation, tp_group=group, backend=backend)
        assert torch.equal(both_loss, loss.detach()), label
        for key in d:
            assert torch.equal(both[key], d[key]), (key,) + label
        log_p, log_ref = (torch.log_softmax(x.double(), -1) for x in (z, r))
        assert max_row_relative_error(both["kl_policy_ref"], kl(log_p, log_ref)) <= 1e-5, label


def check_non_finite(group, index, size, backend):
    from nemo_anchored.ops import anchored_kl

    z, r = full_logits(50, torch.float32), full_logits(51, torch.float32)
    z[1, 2, 3] = math.nan  # lives in the first shard only
    loss = anchored_kl(shard(z, index, size), shard(r, index, size), tp_group=group,
                       backend=backend)
    assert torch.isnan(loss[1, 2]) and torch.isfinite(loss[0]).all()


def check_weights_in_forward(group, index, size, backend, interpolation, mode):
    """The loss weighted in the forward: loss.sum()'s gradient is the weighted reference's, and
    the tokens of weight 0 get loss and gradient 0, even with NaN logits (not read)."""
    from nemo_anchored.ops import anchored_kl
    from tests.reference import anchored_kl_reference, max_row_relative_error, relative_error

    z, r = full_logits(60, torch.float32), full_logits(61, torch.float32)
    c = full_logits(62, torch.float32) if mode == "snapshot" else None
    g = torch.Generator().manual_seed(63)
    weights = torch.rand(z.shape[:-1], generator=g) + 0.5
    weights[torch.rand(weights.shape, generator=g) < 0.35] = 0.0
    weights[1, 2] = 0.0
    ref_loss, ref_grad = anchored_kl_reference(z, r, c, 0.4, interpolation)
    z[1, 2, 3] = math.nan  # in the first shard
    z_local = shard(z, index, size).requires_grad_()
    loss = anchored_kl(z_local, shard(r, index, size),
                       current_logits=None if c is None else shard(c, index, size), alpha=0.4,
                       interpolation=interpolation, tp_group=group, backend=backend,
                       weights=weights)
    loss.sum().backward()
    label = (size, backend, interpolation, mode)
    kept = weights != 0
    assert (loss[~kept] == 0).all() and (z_local.grad[~kept] == 0).all(), label
    assert max_row_relative_error(loss.detach()[kept], (ref_loss * weights)[kept]) <= 1e-5
    expected_grad = shard(ref_grad * weights[..., None].double(), index, size)
    assert relative_error(z_local.grad, expected_grad) <= 1e-5, label


def check_shard_disagreement(group, index):
    from nemo_anchored.ops import anchored_kl

    width = 10 + index  # the ranks of the group disagree on V_local
    with pytest.raises(ValueError, match="tp_group"):
        anchored_kl(torch.zeros(4, width), torch.zeros(4, width), tp_group=group)


def check_all(rank, tp2, tp4):
    cases = itertools.product(["torch", "fused"], ["logit", "prob"], ["live", "snapshot"])
    for n, (backend, interpolation, mode) in enumerate(cases):
        for group, index, size in (tp2, tp4):
            for dtype, temperature in ((torch.float32, 1.0), (torch.float32, 0.7),
                                       (torch.bfloat16, 1.0)):
                check_case(group, index, size, backend, interpolation, mode, dtype,
                           temperature, seed=10 * n)
    for backend in ("torch", "fused"):
        check_non_finite(*tp4, backend)
        for group, index, size in (tp2, tp4):
            for interpolation, mode in (("logit", "live"), ("prob", "snapshot")):
                check_weights_in_forward(group, index, size, backend, interpolation, mode)
    check_shard_disagreement(tp2[0], tp2[1])


def test_tensor_parallel_matches_full_vocabulary_reference():
    spawn_tp_ranks(check_all, world=WORLD)
