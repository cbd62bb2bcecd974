"""The baselines' losses (token_cross_entropy, reverse_kl, dft_loss, stm_keep_mask) against
float64 full-vocabulary math written from the definitions, gradients by autograd through them,
on both kernel sets ("fused" is the C++ extension, which `make test` builds).

Single-process cases first; then one spawn of 4 gloo ranks (process start-up dominates the
cost) forming two TP = 2 groups and one TP = 4 group, each rank holding its contiguous shard of
the same full-vocabulary tensors.
"""
import itertools
import math

import pytest
import torch
import torch.distributed as dist

from nemo_anchored.ops import (dft_loss, fused_available, reverse_kl, stm_keep_mask,
                               token_cross_entropy)
from nemo_anchored.ops.sharded_losses import FusedKernels, _cross_entropy_rows, _reverse_kl_rows
from tests.launch import spawn_tp_ranks
from tests.reference import logits, max_row_relative_error, relative_error

OPS = {"ce": token_cross_entropy, "kl": reverse_kl}
BACKENDS = ["torch", "fused"]
TOLERANCES = {  # (loss: max row relative error, gradient: relative norm error)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-3, 1e-2),
    torch.float16: (1e-3, 2e-3),
    torch.float64: (1e-12, 1e-12),
}


def labels_for(shape, vocab, seed=0):
    return torch.randint(0, vocab, shape[:-1], generator=torch.Generator().manual_seed(seed))


def reference(op, z, other, weights):
    """(loss [...], d sum(weights * loss) / d z) in float64, from the definitions."""
    z64 = z.double().requires_grad_()
    log_p = torch.log_softmax(z64, dim=-1)
    if op == "ce":
        loss = -log_p.gather(-1, other[..., None]).squeeze(-1)
    else:
        log_r = torch.log_softmax(other.double(), dim=-1)
        # Columns with p = 0 contribute 0; masking the difference (not the product) keeps the
        # NaN of -inf - (-inf) out of the gradient.
        difference = torch.where(log_p > -math.inf, log_p - log_r, torch.zeros_like(log_p))
        loss = (log_p.exp() * difference).sum(-1)
    (grad,) = torch.autograd.grad((loss * weights.double()).sum(), z64)
    return loss.detach(), grad


def run(op, z, other, weights, tp_group=None, backend="auto"):
    """(loss, d sum(weights * loss) / d z) from the operator."""
    zz = z.clone().requires_grad_()
    loss = OPS[op](zz, other, tp_group=tp_group, backend=backend)
    (grad,) = torch.autograd.grad((loss * weights).sum(), zz)
    return loss.detach(), grad


def inputs(op, shape, dtype=torch.float32, seed=0, padded=0):
    """(policy logits, labels or reference logits, per-token weights)."""
    z = logits(shape, dtype, seed=seed, padded=padded)
    other = (labels_for(shape, shape[-1] - padded, seed + 1) if op == "ce"
             else logits(shape, dtype, seed=seed + 1, padded=padded))
    weights = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(seed + 2))
    return z, other, weights


# --------------------------------------------------------------------------------------------
# Single process.


def test_extension_is_built():
    # The fused cases below would fail on a missing extension, but say why here.
    assert fused_available("cpu"), "nemo_anchored._C is not built: run `make build`"


# The fused kernels take fp32, bf16 and fp16 (float64 raises: test_bad_arguments...).
DTYPE_BACKENDS = [(dtype, backend) for dtype in TOLERANCES for backend in BACKENDS
                  if not (dtype == torch.float64 and backend == "fused")]


@pytest.mark.parametrize("dtype,backend", DTYPE_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_matches_float64_reference(op, dtype, backend):
    shape = (4, 16, 1003)  # a vocabulary that is no power of two
    z, other, weights = inputs(op, shape, dtype, seed=1)
    loss, grad = run(op, z, other, weights, backend=backend)
    ref_loss, ref_grad = reference(op, z, other, weights)
    assert loss.shape == shape[:-1]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert max_row_relative_error(loss, ref_loss) <= loss_tol
    assert relative_error(grad, ref_grad) <= grad_tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_padded_columns_carry_nothing(op, backend):
    z, other, weights = inputs(op, (6, 640), seed=3, padded=40)
    loss, grad = run(op, z, other, weights, backend=backend)
    ref_loss, ref_grad = reference(op, z, other, weights)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[:, -40:] == 0).all()
    assert max_row_relative_error(loss, ref_loss) <= 1e-5
    assert relative_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_whole_blocks_padded_or_far_below_the_row_max(op, backend):
    # The CPU's unsharded rows keep their exps per block of 512 columns relative to the block's
    # own max and rescale them by block: here a block far below the others (its scale
    # underflows), a block of nothing but -inf (a padded vocabulary's tail) and one partly padded.
    z, other, weights = inputs(op, (5, 1700), seed=30, padded=600)
    for t in (z, other) if op == "kl" else (z,):
        t[:, :512] -= 120.0
    loss, grad = run(op, z, other, weights, backend=backend)
    ref_loss, ref_grad = reference(op, z, other, weights)
    assert max_row_relative_error(loss, ref_loss) <= 1e-5
    assert relative_error(grad, ref_grad) <= 1e-5
    assert (grad[:, 1100:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_at_a_minus_inf_column_gives_infinite_loss(backend):
    z, labels, weights = inputs("ce", (5, 300), seed=4, padded=10)
    labels[2] = 295  # a padded column
    loss, grad = run("ce", z, labels, weights, backend=backend)
    ref_loss, ref_grad = reference("ce", z, labels, weights)
    assert loss[2] == math.inf and torch.isfinite(loss[[0, 1, 3, 4]]).all()
    assert torch.isfinite(grad).all()  # p - onehot stays finite
    assert relative_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("op", OPS)
def test_non_finite_input_gives_nan_for_that_row_only(op, bad, backend):
    z, other, weights = inputs(op, (4, 300), seed=15, padded=6)
    ref_loss, ref_grad = reference(op, z, other, weights)
    targets = ["policy"] if op == "ce" else ["policy", "reference"]
    for target in targets:
        zz, oo = z.clone(), other.clone()
        (zz if target == "policy" else oo)[2, 17] = bad
        loss, grad = run(op, zz, oo, weights, backend=backend)
        # The gradient is non-finite where the policy has mass (a padded column, -inf in the
        # policy, keeps its exact 0 when only the reference is bad).
        assert torch.isnan(loss[2]) and not torch.isfinite(grad[2, :-6]).any(), target
        keep = [0, 1, 3]
        assert max_row_relative_error(loss[keep], ref_loss[keep]) <= 1e-5, target
        assert relative_error(grad[keep], ref_grad[keep]) <= 1e-5, target


@pytest.mark.parametrize("op", OPS)
def test_fused_and_torch_kernels_agree_at_a_real_vocabulary(op):
    # bf16 logits over a 32000-column vocabulary with padding, as the trainer hands them over.
    z, other, weights = inputs(op, (8, 32000), torch.bfloat16, seed=16, padded=64)
    fused_loss, fused_grad = run(op, z, other, weights, backend="fused")
    torch_loss, torch_grad = run(op, z, other, weights, backend="torch")
    assert max_row_relative_error(fused_loss, torch_loss) <= 1e-5
    assert relative_error(fused_grad, torch_grad) <= 1e-2  # bf16 rounding of either
    assert (fused_grad[:, -64:] == 0).all()


class ShardedPassesOnly:
    """The fused kernels without the unsharded shortcut: those of the TP > 1 path."""

    loss_stats = staticmethod(FusedKernels.loss_stats)
    cross_entropy_grad = staticmethod(FusedKernels.cross_entropy_grad)
    reverse_kl = staticmethod(FusedKernels.reverse_kl)


def check_sharded_passes(op, device):
    """The statistics and gradient kernels on one shard that is the whole row (the merge of a
    group of one) against the unsharded call that runs both passes per row."""
    z, other, _ = inputs(op, (16, 4096), torch.bfloat16, seed=18, padded=5)
    z, other = z.to(device), other.to(device)
    rows = _cross_entropy_rows if op == "ce" else _reverse_kl_rows
    sharded = rows(z, other, None, ShardedPassesOnly(), need_grad=True)
    unsharded = rows(z, other, None, FusedKernels(), need_grad=True)
    assert max_row_relative_error(sharded[0].cpu(), unsharded[0].cpu()) <= 1e-5
    assert relative_error(sharded[1].cpu(), unsharded[1].cpu()) <= 1e-2  # bf16 rounding


@pytest.mark.parametrize("op", OPS)
def test_sharded_passes_match_the_unsharded_call(op):
    check_sharded_passes(op, "cpu")


def check_weights_in_forward(op, dtype, backend, seed, tp_group=None, index=0, size=1):
    """loss.sum() of the loss weighted in the forward, on this rank's shard, against float64
    math with the weights applied after: loss and gradient scaled per token, and exactly 0 at
    the tokens of weight 0 (about a third), even where their logits are NaN (the fused CPU
    kernels do not read them). V_FULL, PADDED and shard: the tensor-parallel section's."""
    z, other, weights = inputs(op, (3, 5, V_FULL), dtype, seed=seed, padded=PADDED)
    weights[torch.rand(weights.shape, generator=torch.Generator().manual_seed(seed)) < 0.35] = 0
    weights[0, 0] = 0.0
    ref_loss, ref_grad = reference(op, z, other, weights)
    z[0, 0, 7] = math.nan  # in the first shard
    zz = shard(z, index, size).requires_grad_()
    local_other = other if op == "ce" else shard(other, index, size)
    loss = OPS[op](zz, local_other, tp_group=tp_group, backend=backend, weights=weights)
    loss.sum().backward()

    label = (op, size, dtype, backend)
    loss_tol, grad_tol = TOLERANCES[dtype]
    kept = weights != 0
    assert (loss[~kept] == 0).all() and (zz.grad[~kept] == 0).all(), label
    assert max_row_relative_error(loss.detach()[kept], (ref_loss * weights)[kept]) <= loss_tol
    assert zz.grad.dtype == dtype, label
    assert relative_error(zz.grad, shard(ref_grad, index, size)) <= grad_tol, label


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_weights_taken_in_the_forward(op, dtype, backend):
    check_weights_in_forward(op, dtype, backend, seed=15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_is_infinite_where_the_reference_has_no_mass(backend):
    z, r = logits((3, 200), seed=5), logits((3, 200), seed=6)
    r[1, 17] = -math.inf  # p > 0 there, p_ref = 0
    loss = reverse_kl(z, r, backend=backend)
    assert loss[1] == math.inf and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_stays_accurate_near_the_reference(backend):
    # KL-SFT starts with the policy at its reference: KL = 0 with a zero gradient, then tiny.
    # Each tenfold smaller perturbation must divide the KL by about 100, down to KL ~ 5e-9 in
    # fp32: this fails if the KL is formed as a sum of terms of both signs, whose rounding alone
    # is ~1e-7. The gradient p (log p - log p_ref - KL) must stay accurate too, although
    # log p - log p_ref (~1e-4 here) inherits a ~1e-7 shift from the two log-sum-exps.
    r = logits((16, 4000), scale=1.0, seed=7)
    noise = logits((16, 4000), scale=1.0, seed=8)
    zero, grad = run("kl", r, r, torch.ones(16), backend=backend)
    assert (zero == 0).all() and (grad == 0).all()
    losses = []
    for eps in (1e-2, 1e-3, 1e-4):
        z = r + eps * noise
        loss, grad = run("kl", z, r, torch.ones(16), backend=backend)
        ref_loss, ref_grad = reference("kl", z, r, torch.ones(16))
        assert (loss > 0).all()
        assert max_row_relative_error(loss, ref_loss) <= 1e-4, eps
        assert relative_error(grad, ref_grad) <= 1e-5, eps
        losses.append(loss)
    for big, small in zip(losses, losses[1:]):
        ratio = big / small
        assert ((ratio > 80) & (ratio < 120)).all(), ratio


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_inputs_are_not_modified(op, dtype, backend):
    z, other, weights = inputs(op, (3, 7, 101), dtype, seed=9, padded=3)
    z_before, other_before = z.clone(), other.clone()
    zz = z.requires_grad_()
    (OPS[op](zz, other, backend=backend) * weights).sum().backward()
    assert torch.equal(zz.detach(), z_before) and torch.equal(other, other_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_no_gradient_needed_and_second_backward_refused(op, backend):
    z, other, weights = inputs(op, (3, 40), seed=10)
    with torch.no_grad():
        loss = OPS[op](z.clone().requires_grad_(), other, backend=backend)
    assert not loss.requires_grad
    assert max_row_relative_error(loss, reference(op, z, other, weights)[0]) <= 1e-5
    total = OPS[op](z.clone().requires_grad_(), other, backend=backend).sum()
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_sft_objective_sums_both_gradients(backend):
    z, labels, _ = inputs("ce", (2, 6, 500), seed=11)
    r = logits((2, 6, 500), seed=12)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    zz = z.clone().requires_grad_()
    loss = (token_cross_entropy(zz, labels, backend=backend)
            + 0.2 * reverse_kl(zz, r, backend=backend))
    ((loss * mask).sum() / mask.sum()).backward()
    weights = mask / mask.sum()
    expected = reference("ce", z, labels, weights)[1] + reference("kl", z, r, 0.2 * weights)[1]
    assert relative_error(zz.grad, expected) <= 1e-5
    assert (zz.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dft_loss_weights_ce_by_the_detached_target_probability(backend):
    z, labels, weights = inputs("ce", (4, 9, 300), seed=13, padded=5)
    labels[1, 2] = 297  # a padded column: p(y) = 0, ce = inf, DFT loss 0 (the limit p log p)
    zz = z.clone().requires_grad_()
    loss = dft_loss(token_cross_entropy(zz, labels, backend=backend))
    (loss * weights).sum().backward()

    z64 = z.double().requires_grad_()
    log_p_label = torch.log_softmax(z64, -1).gather(-1, labels[..., None]).squeeze(-1)
    finite = torch.isfinite(log_p_label)
    expected = -torch.where(finite, log_p_label.exp().detach() * log_p_label, 0)
    (expected * weights.double()).sum().backward()
    assert loss[1, 2] == 0 and max_row_relative_error(loss, expected.detach(), 1e-6) <= 1e-5
    assert torch.isfinite(zz.grad).all() and relative_error(zz.grad, z64.grad) <= 1e-5
    assert torch.isnan(dft_loss(torch.tensor([math.nan]))).all()  # NaN is not hidden


@pytest.mark.parametrize("backend", BACKENDS)
def test_stm_keep_mask_drops_high_perplexity_tokens(backend):
    edge = math.log(2.5)
    ce = torch.tensor([0.0, edge - 1e-3, edge + 1e-3, 50.0, 200.0, math.inf, math.nan])
    keep = stm_keep_mask(ce, 2.5)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, True, False, False, False, False, False]
    z, labels, _ = inputs("ce", (8, 30, 50), seed=14)
    with torch.no_grad():
        base_ce = token_cross_entropy(z, labels, backend=backend)
    expected = torch.exp(reference("ce", z, labels, torch.ones(8, 30))[0]) <= 2.5
    assert torch.equal(stm_keep_mask(base_ce, 2.5), expected)
    assert 0 < expected.sum() < expected.numel()  # the case is not trivial


Z = torch.zeros(3, 10)
LABELS = torch.zeros(3, dtype=torch.int64)


@pytest.mark.parametrize("call,pattern", [
    (lambda: token_cross_entropy(torch.zeros(3, 10, dtype=torch.int64), LABELS), "logits must be"),
    (lambda: token_cross_entropy(torch.zeros(3, 0), LABELS), "logits must have"),
    (lambda: token_cross_entropy(Z, LABELS.float()), "labels must be an integer"),
    (lambda: token_cross_entropy(Z, LABELS.bool()), "labels must be an integer"),
    (lambda: token_cross_entropy(Z, [0, 0, 0]), "labels must be an integer"),
    (lambda: token_cross_entropy(Z, torch.zeros(3, 1, dtype=torch.int64)), "labels has shape"),
    (lambda: token_cross_entropy(Z, LABELS.to("meta")), "labels is on meta"),
    (lambda: token_cross_entropy(Z, torch.tensor([0, -100, 1])), r"labels must lie in \[0, 10\)"),
    (lambda: token_cross_entropy(Z, torch.tensor([0, 10, 1])), r"labels must lie in \[0, 10\)"),
    (lambda: reverse_kl(torch.zeros(3, 10, dtype=torch.int64), Z), "policy_logits must be"),
    (lambda: reverse_kl(torch.zeros(3, 0), torch.zeros(3, 0)), "policy_logits must have"),
    (lambda: reverse_kl(Z, None), "reference_logits must be a tensor"),
    (lambda: reverse_kl(Z, torch.zeros(3, 9)), "reference_logits has shape"),
    (lambda: reverse_kl(Z, Z.double()), "reference_logits has dtype"),
    (lambda: reverse_kl(Z, Z.to("meta")), "reference_logits is on meta"),
    (lambda: token_cross_entropy(Z, LABELS, backend="cuda"), "backend must be one of"),
    (lambda: reverse_kl(Z, Z, backend=None), "backend must be one of"),
    (lambda: token_cross_entropy(Z.double(), LABELS, backend="fused"), "backend='fused' takes"),
    (lambda: reverse_kl(Z.double(), Z.double(), backend="fused"), "backend='fused' takes"),
    (lambda: token_cross_entropy(Z, LABELS, weights=torch.ones(2)), "weights has shape"),
    (lambda: reverse_kl(Z, Z, weights=LABELS), "weights must be a floating-point"),
    (lambda: dft_loss(LABELS), "ce must be"),
    (lambda: stm_keep_mask(LABELS, 2.5), "base_ce must be"),
    (lambda: stm_keep_mask(Z, 0.0), "threshold must be"),
    (lambda: stm_keep_mask(Z, math.nan), "threshold must be"),
    (lambda: stm_keep_mask(Z, True), "threshold must be"),
])
def test_bad_arguments_raise_value_error(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# --------------------------------------------------------------------------------------------
# Tensor parallel: 4 gloo ranks, TP = 2 and TP = 4.

WORLD = 4
V_FULL = 4 * 251  # shards of 502 (TP = 2) and 251 (TP = 4): not powers of two
PADDED = 13  # trailing padded (-inf) columns of the full vocabulary: inside the last shard


def shard(x, index, size):
    width = x.shape[-1] // size
    return x[..., index * width:(index + 1) * width].contiguous()


def check_sharded(op, group, index, size, dtype, backend, seed):
    z, other, weights = inputs(op, (3, 5, V_FULL), dtype, seed=seed, padded=PADDED)
    if op == "ce":
        other[0, 0] = V_FULL - 1  # a label in the padding: +inf on every rank
    ref_loss, ref_grad = reference(op, z, other, weights)
    local_other = other if op == "ce" else shard(other, index, size)
    loss, grad = run(op, shard(z, index, size), local_other, weights, tp_group=group,
                     backend=backend)

    label = (op, size, dtype, backend)
    loss_tol, grad_tol = TOLERANCES[dtype]
    finite = torch.isfinite(ref_loss)
    assert torch.equal(torch.isfinite(loss), finite), label
    assert max_row_relative_error(loss[finite], ref_loss[finite]) <= loss_tol, label
    assert grad.dtype == dtype and relative_error(grad, shard(ref_grad, index, size)) <= grad_tol
    everyone = [torch.empty_like(loss) for _ in range(size)]
    dist.all_gather(everyone, loss, group=group)
    assert all(torch.equal(everyone[0], other_loss) for other_loss in everyone), label


def check_non_finite(op, group, index, size, backend):
    z, other, weights = inputs(op, (4, V_FULL), seed=60, padded=PADDED)
    z[2, 3] = math.nan  # lives in the first shard only
    local_other = other if op == "ce" else shard(other, index, size)
    loss, grad = run(op, shard(z, index, size), local_other, weights, tp_group=group,
                     backend=backend)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all(), (op, size, backend)
    assert torch.isfinite(loss[[0, 1, 3]]).all() and torch.isfinite(grad[[0, 1, 3]]).all()


def check_bad_arguments(group, index, size):
    z = torch.zeros(2, V_FULL // size)
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {V_FULL}\)"):
        token_cross_entropy(z, torch.tensor([0, V_FULL]), tp_group=group)
    width = 10 + index  # the ranks of the group disagree on V_local
    with pytest.raises(ValueError, match="tp_group"):
        reverse_kl(torch.zeros(4, width), torch.zeros(4, width), tp_group=group)


def check_all(rank, tp2, tp4):
    for group, index, size in (tp2, tp4):
        for seed, op in enumerate(OPS):
            for dtype, backend in itertools.product((torch.float32, torch.bfloat16), BACKENDS):
                check_sharded(op, group, index, size, dtype, backend, seed=10 * seed)
            for backend in BACKENDS:
                check_non_finite(op, group, index, size, backend)
            for dtype, backend in itertools.product((torch.float32, torch.bfloat16), BACKENDS):
                check_weights_in_forward(op, dtype, backend, 20 + seed, group, index, size)
        check_bad_arguments(group, index, size)


@pytest.mark.slow
def test_tensor_parallel_matches_full_vocabulary_reference():
    spawn_tp_ranks(check_all, world=WORLD)
