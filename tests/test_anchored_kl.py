"""anchored_kl and anchor_diagnostics on one process, against float64 full-vocabulary math.

Every case runs on both backends; "fused" is the C++ extension, which `make test` builds.
"""
import functools
import itertools
import math

import pytest
import torch

from nemo_anchored.ops import anchor_diagnostics, anchored_kl, fused_available
from nemo_anchored.ops.anchored_kl import anchored_kl_and_diagnostics
from tests.reference import anchored_kl_loss_and_grad as run
from tests.reference import (anchor_log_probs, anchored_kl_reference, kl, logits,
                             max_row_relative_error, relative_error)

BACKENDS = ["torch", "fused"]


def test_extension_is_built():
    # The fused cases below would silently exercise nothing if the extension were missing.
    assert fused_available("cpu"), "nemo_anchored._C is not built: run `make build`"


CASES = list(itertools.product(["logit", "prob"], ["live", "snapshot"], [1.0, 0.7]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation,mode,temperature", CASES)
def test_matches_float64_reference_fp32(backend, interpolation, mode, temperature):
    shape = (3, 5, 1003)  # a vocabulary that is no power of two
    z, r = logits(shape, seed=1), logits(shape, seed=2)
    c = logits(shape, seed=3) if mode == "snapshot" else None
    weights = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(4))
    loss, grad = run(z, r, c, weights, alpha=0.3, interpolation=interpolation,
                     temperature=temperature, backend=backend)
    ref_loss, ref_grad = anchored_kl_reference(z, r, c, 0.3, interpolation, temperature)
    assert loss.dtype == torch.float32 and loss.shape == shape[:-1]
    assert grad.dtype == torch.float32
    assert max_row_relative_error(loss, ref_loss) <= 1e-5
    assert relative_error(grad, ref_grad * weights[..., None].double()) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation,mode", [("logit", "live"), ("logit", "snapshot"),
                                                ("prob", "live"), ("prob", "snapshot")])
@pytest.mark.parametrize("alpha", [0.5, 0.01])
def test_matches_float64_reference_bf16(backend, interpolation, mode, alpha):
    # alpha = 0.01 puts q within about 1% of p: p - q is a small difference of close numbers,
    # which only survives bf16 inputs when it is formed in fp32 and rounded once.
    shape = (64, 2000)
    z, r = logits(shape, torch.bfloat16, seed=5), logits(shape, torch.bfloat16, seed=6)
    c = logits(shape, torch.bfloat16, seed=7) if mode == "snapshot" else None
    loss, grad = run(z, r, c, alpha=alpha, interpolation=interpolation, temperature=1.3,
                     backend=backend)
    ref_loss, ref_grad = anchored_kl_reference(z, r, c, alpha, interpolation, 1.3)
    assert grad.dtype == torch.bfloat16
    assert max_row_relative_error(loss, ref_loss) <= 1e-3
    assert relative_error(grad, ref_grad) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(dtype):
    z, r = logits((4, 777), dtype, seed=8), logits((4, 777), dtype, seed=9)
    ref_loss, ref_grad = anchored_kl_reference(z, r, None, 0.5, "logit")
    backends = ["torch"] if dtype == torch.float64 else BACKENDS
    for backend in backends:
        loss, grad = run(z, r, alpha=0.5, backend=backend)
        tol = 1e-12 if dtype == torch.float64 else 1e-3
        assert max_row_relative_error(loss, ref_loss) <= tol
        assert relative_error(grad, ref_grad) <= (1e-12 if dtype == torch.float64 else 2e-3)


def test_gradient_is_the_derivative_of_the_loss():
    # Independent of the p - q formula: float64 autograd through the definition, with the
    # anchor built from a detached copy (live mode) and from a separate tensor (snapshot).
    z, r, c = logits((6, 301), seed=10), logits((6, 301), seed=11), logits((6, 301), seed=12)
    for interpolation, current in itertools.product(["logit", "prob"], [None, c]):
        z64 = z.double().requires_grad_()
        cur = z64.detach() if current is None else current
        log_q = anchor_log_probs(cur, r, 0.4, interpolation, 0.8)
        expected = kl(log_q, torch.log_softmax(z64 / 0.8, -1))
        (expected_grad,) = torch.autograd.grad(expected.sum(), z64)
        for backend in BACKENDS:
            _, grad = run(z, r, current, alpha=0.4, interpolation=interpolation,
                          temperature=0.8, backend=backend)
            assert relative_error(grad, expected_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_one_is_forward_kl_distillation(backend):
    z, r, c = logits((8, 500), seed=13), logits((8, 500), seed=14), logits((8, 500), seed=15)
    distill = kl(torch.log_softmax(r.double(), -1), torch.log_softmax(z.double(), -1))
    target_grad = torch.softmax(z.double(), -1) - torch.softmax(r.double(), -1)
    for interpolation, current in itertools.product(["logit", "prob"], [None, c]):
        loss, grad = run(z, r, current, alpha=1.0, interpolation=interpolation, backend=backend)
        assert max_row_relative_error(loss, distill) <= 1e-5
        assert relative_error(grad, target_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation", ["logit", "prob"])
def test_small_alpha_drives_loss_to_zero_quadratically(backend, interpolation):
    # Live mode: q -> p as alpha -> 0 and KL(q || p) = O(alpha^2). Each tenfold smaller alpha
    # must divide the loss by about 100, down to alpha = 1e-4 in fp32 (KL ~ 1e-8): this fails if
    # the loss is formed as a difference of O(1) terms, whose rounding alone is ~1e-7. (The
    # floor that remains is ~1e-12 absolute: half the square of the fp32 LSE rounding.)
    z, r = logits((16, 4000), scale=1.0, seed=16), logits((16, 4000), scale=1.0, seed=17)
    alphas = [1e-2, 1e-3, 1e-4]
    losses = [anchored_kl(z, r, alpha=a, interpolation=interpolation, backend=backend)
              for a in alphas]
    refs = [anchored_kl_reference(z, r, None, a, interpolation)[0] for a in alphas]
    for loss, ref in zip(losses, refs):
        assert (loss >= 0).all()
        assert max_row_relative_error(loss, ref) <= 1e-4
    for big, small in zip(losses, losses[1:]):
        ratio = big / small
        assert ((ratio > 80) & (ratio < 120)).all(), ratio


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_and_padded_logits(backend):
    g = torch.Generator().manual_seed(18)
    shape = (6, 640)
    signs = torch.randint(0, 2, shape, generator=g) * 2 - 1
    z = (signs * 1e4 * torch.rand(shape, generator=g)).float()
    r = (torch.randint(0, 2, shape, generator=g) * 2e4 - 1e4).float()
    c = logits(shape, scale=1e3, seed=19)
    for t in (z, r, c):  # padded vocabulary: the last 40 columns carry no mass in any model
        t[:, -40:] = -math.inf
    for interpolation, current, alpha in itertools.product(["logit", "prob"], [None, c],
                                                           [0.5, 1.0]):
        loss, grad = run(z, r, current, alpha=alpha, interpolation=interpolation,
                         backend=backend)
        ref_loss, ref_grad = anchored_kl_reference(z, r, current, alpha, interpolation)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        # Logits of 1e4 are spaced 1e-3 apart in fp32; differences of such numbers round at
        # that scale, which sets a floor of ~1e-4 relative for a KL of ~10.
        assert max_row_relative_error(loss, ref_loss, floor=1e-6) <= 1e-4
        assert relative_error(grad, ref_grad) <= 1e-5
        assert (grad[:, -40:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_blocks_padded_or_far_below_the_row_max(backend):
    # The CPU kernel takes exps per block of 512 columns relative to the block's own max and
    # rescales them by block: here a block far below the others (its scale underflows), a
    # block of nothing but -inf (a padded vocabulary's tail) and one partly padded.
    z, r, c = (logits((5, 1700), seed=s, padded=600) for s in (40, 41, 42))
    for t in (z, r, c):
        t[:, :512] -= 120.0
    for interpolation, current in itertools.product(["logit", "prob"], [None, c]):
        loss, grad = run(z, r, current, alpha=0.5, interpolation=interpolation, backend=backend)
        ref_loss, ref_grad = anchored_kl_reference(z, r, current, 0.5, interpolation)
        assert max_row_relative_error(loss, ref_loss) <= 1e-5
        assert relative_error(grad, ref_grad) <= 1e-5
        assert (grad[:, 1100:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_mass_where_policy_has_none_is_infinite(backend):
    z, r = logits((2, 50), seed=20), logits((2, 50), seed=21)
    z[0, 7] = -math.inf  # the policy rules out a token the reference allows
    loss = anchored_kl(z, r, alpha=0.5, interpolation="prob", backend=backend)
    assert loss[0] == math.inf
    assert torch.isfinite(loss[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_gives_nan_loss_for_that_row_only(backend, bad):
    z, r = logits((4, 300), seed=22), logits((4, 300), seed=23)
    ref_loss, ref_grad = anchored_kl_reference(z, r, None, 0.5, "logit")
    for target in ("policy", "reference"):
        zz, rr = z.clone(), r.clone()
        (zz if target == "policy" else rr)[2, 17] = bad
        loss, grad = run(zz, rr, alpha=0.5, backend=backend)
        assert torch.isnan(loss[2]), (target, loss)
        assert torch.isnan(grad[2]).all()
        keep = [0, 1, 3]
        assert max_row_relative_error(loss[keep], ref_loss[keep]) <= 1e-5
        assert relative_error(grad[keep], ref_grad[keep]) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_lemma_bounds_hold(backend, scale):
    # Lemma 5.1 (prob): KL(q || p_cur) <= alpha KL(p_ref || p_cur);
    # Lemma 5.3 (logit): KL(q || p_cur) <= alpha / (1 - alpha) KL(p_cur || p_ref).
    dtype = torch.float64 if backend == "torch" else torch.float32
    z, r = logits((256, 500), dtype, scale, 24), logits((256, 500), dtype, scale, 25)
    c = logits((256, 500), dtype, scale, 26)
    p_ref = torch.log_softmax(r.double(), -1)
    for alpha, current in itertools.product([0.05, 0.5, 0.95], [None, c]):
        p_cur = torch.log_softmax((z if current is None else current).double(), -1)
        expected_bound = {"prob": alpha * kl(p_ref, p_cur),
                          "logit": alpha / (1 - alpha) * kl(p_cur, p_ref)}
        for interpolation in ("logit", "prob"):
            d = anchor_diagnostics(z, r, current_logits=current, alpha=alpha,
                                   interpolation=interpolation, backend=backend)
            step = kl(anchor_log_probs(p_cur, r, alpha, interpolation), p_cur)
            assert max_row_relative_error(d["anchor_step_kl"], step) <= 1e-4
            assert max_row_relative_error(d["bound"], expected_bound[interpolation]) <= 1e-4
            assert max_row_relative_error(d["kl_cur_ref"], kl(p_cur, p_ref)) <= 1e-4
            assert (d["anchor_step_kl"] <= d["bound"] * (1 + 1e-5) + 1e-7).all()
            assert (d["anchor_step_kl"] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_bound_at_alpha_one(backend):
    # alpha / (1 - alpha) x KL(p_cur || p_ref) is inf at alpha = 1, but 0 where the current
    # model is the reference (the anchor is then the current model): not inf x 0 = NaN.
    r = logits((4, 300), seed=40)
    z = torch.cat([r[:2], logits((2, 300), seed=41)])
    d = anchor_diagnostics(z, r, alpha=1.0, interpolation="logit", backend=backend)
    assert d["bound"].tolist() == [0.0, 0.0, math.inf, math.inf]
    assert d["anchor_step_kl"][:2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_diagnostic(backend):
    z, r = logits((7, 333), seed=27), logits((7, 333), seed=28)
    z[:, :5] = -math.inf
    log_p = torch.log_softmax(z.double() / 2.0, -1)
    entropy = -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0).sum(-1)
    d = anchor_diagnostics(z, r, temperature=2.0, backend=backend)
    assert max_row_relative_error(d["entropy"], entropy) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation,mode", [("logit", "live"), ("logit", "snapshot"),
                                                ("prob", "live"), ("prob", "snapshot")])
def test_loss_with_diagnostics_is_both_calls_in_one(backend, interpolation, mode):
    # The trainer's diagnosed steps: the loss and its gradient bit for bit those of
    # anchored_kl, the diagnostics those of anchor_diagnostics, and KL(p_theta || p_ref).
    shape = (3, 5, 301)
    z, r = logits(shape, seed=40), logits(shape, seed=41)
    c = logits(shape, seed=42) if mode == "snapshot" else None
    options = dict(alpha=0.3, interpolation=interpolation, temperature=0.8, backend=backend)
    zz = z.clone().requires_grad_()
    loss, d = anchored_kl_and_diagnostics(zz, r, current_logits=c, **options)
    (grad,) = torch.autograd.grad(loss.sum(), zz)
    expected_loss, expected_grad = run(z, r, c, **options)
    assert torch.equal(loss.detach(), expected_loss) and torch.equal(grad, expected_grad)
    expected = anchor_diagnostics(z, r, current_logits=c, **options)
    assert set(d) == set(expected) | {"kl_policy_ref"}
    for key, value in expected.items():
        assert torch.equal(d[key], value), key
    log_p, log_ref = (torch.log_softmax(x.double() / 0.8, -1) for x in (z, r))
    assert max_row_relative_error(d["kl_policy_ref"], kl(log_p, log_ref)) <= 1e-5


def weights_with_zeros(shape, seed):
    """Per-token weights in [0.5, 1.5) with about a third of them 0 (a loss mask's dropped
    tokens), the first token's among them."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(shape, generator=g) + 0.5
    weights[torch.rand(shape, generator=g) < 0.35] = 0.0
    weights.view(-1)[0] = 0.0
    return weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interpolation,mode", [("logit", "live"), ("prob", "snapshot")])
def test_weights_taken_in_the_forward(backend, dtype, interpolation, mode):
    # loss.sum() of the weighted loss against float64 math with the weights applied after: the
    # loss and gradient scaled per token, and exactly 0 at the tokens of weight 0, even where
    # their logits are NaN (the fused CPU kernels do not read them).
    shape = (3, 7, 1003)
    z, r = logits(shape, dtype, seed=60), logits(shape, dtype, seed=61)
    c = logits(shape, dtype, seed=62) if mode == "snapshot" else None
    weights = weights_with_zeros(shape[:-1], seed=63)
    z[0, 0, 5] = math.nan  # at a token of weight 0
    options = dict(alpha=0.3, interpolation=interpolation, temperature=0.9, backend=backend)
    zz = z.clone().requires_grad_()
    loss = anchored_kl(zz, r, current_logits=c, weights=weights, **options)
    loss.sum().backward()
    clean = z.clone()
    clean[0, 0, 5] = 0.0
    ref_loss, ref_grad = anchored_kl_reference(clean, r, c, 0.3, interpolation, 0.9)
    kept = weights != 0
    loss_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, 1e-2)
    assert (loss[~kept] == 0).all() and (zz.grad[~kept] == 0).all()
    assert max_row_relative_error(loss.detach()[kept], (ref_loss * weights)[kept]) <= loss_tol
    assert relative_error(zz.grad, ref_grad * weights[..., None].double()) <= grad_tol
    assert zz.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation,mode", [("logit", "live"), ("prob", "snapshot")])
def test_weighted_loss_with_diagnostics(backend, interpolation, mode):
    # The trainer's diagnosed step with the loss mask as weights: the loss and gradient those of
    # anchored_kl with the weights, the diagnostics unweighted (anchor_diagnostics') but 0 at
    # the tokens of weight 0.
    shape = (2, 9, 301)
    z, r = logits(shape, seed=64), logits(shape, seed=65)
    c = logits(shape, seed=66) if mode == "snapshot" else None
    weights = weights_with_zeros(shape[:-1], seed=67)
    options = dict(alpha=0.3, interpolation=interpolation, backend=backend)
    zz = z.clone().requires_grad_()
    loss, d = anchored_kl_and_diagnostics(zz, r, current_logits=c, weights=weights, **options)
    loss.sum().backward()
    alone = z.clone().requires_grad_()
    expected_loss = anchored_kl(alone, r, current_logits=c, weights=weights, **options)
    expected_loss.sum().backward()
    assert torch.equal(loss.detach(), expected_loss.detach())
    assert torch.equal(zz.grad, alone.grad)
    kept = weights != 0
    expected = anchor_diagnostics(z, r, current_logits=c, **options)
    log_p, log_ref = (torch.log_softmax(x.double(), -1) for x in (z, r))
    expected["kl_policy_ref"] = kl(log_p, log_ref)
    for key, value in expected.items():
        assert (d[key][~kept] == 0).all(), key
        assert max_row_relative_error(d[key][kept], value[kept]) <= 1e-5, key


def test_proposition_5_4_geometric_recursion():
    # Exact projection in probability space: p_{t+1} = q(t). The anchor is read back from the
    # operator's own gradient at the snapshot (p - q), so this checks what the trainer optimises.
    alpha, steps = 0.3, 6
    base, sft = logits((32, 200), torch.float64, seed=29), logits((32, 200), torch.float64, seed=30)
    p_base, p_sft = torch.softmax(base, -1), torch.softmax(sft, -1)
    kl_base = kl(p_base.log(), p_sft.log())
    z = base.clone()
    for t in range(1, steps + 1):
        snapshot = z
        _, grad = run(snapshot, sft, snapshot, alpha=alpha, interpolation="prob", backend="torch")
        q = torch.softmax(snapshot, -1) - grad
        z = q.log()  # the exact minimiser of KL(q || p_theta): loss and gradient vanish there
        at_minimum, grad_at_minimum = run(z, sft, snapshot, alpha=alpha, interpolation="prob",
                                          backend="torch")
        assert at_minimum.abs().max() < 1e-14 and grad_at_minimum.abs().max() < 1e-14
        closed_form = (1 - alpha) ** t * p_base + (1 - (1 - alpha) ** t) * p_sft
        assert relative_error(q, closed_form) <= 1e-12
        assert (kl(q.log(), p_sft.log()) <= (1 - alpha) ** t * kl_base + 1e-15).all()


def test_loss_is_usable_with_a_token_mask():
    z, r = logits((2, 6, 100), seed=31), logits((2, 6, 100), seed=32)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    zz = z.clone().requires_grad_()
    loss = anchored_kl(zz, r)
    ((loss * mask).sum() / mask.sum()).backward()
    assert (zz.grad[mask == 0] == 0).all()
    _, ref_grad = anchored_kl_reference(z, r)
    assert relative_error(zz.grad, ref_grad * (mask / mask.sum())[..., None]) <= 1e-5


def test_second_backward_is_refused():
    z = logits((3, 40)).requires_grad_()
    loss = anchored_kl(z, logits((3, 40), seed=33)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Nor is there a second derivative: it would silently leave the loss's term out of a
    # Hessian-vector product or a gradient penalty.
    z = logits((3, 40)).requires_grad_()
    loss = anchored_kl(z, logits((3, 40), seed=33)).sum()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, z, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_scaling_matches_torch(dtype):
    # The CPU backward scales the gradient rows in the extension (csrc/scale_rows_cpu.cpp): bitwise
    # what torch's fp32 multiply rounded once to the dtype gives, non-finite values included,
    # with the version bump that makes autograd refuse a second backward.
    from nemo_anchored import _C
    grad = (torch.randn(6, 1003, generator=torch.Generator().manual_seed(40)) * 100).to(dtype)
    grad[1, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    scale = torch.tensor([0.25, 1.0, -2.0, 0.0, math.inf, 3e-5])  # rows scaled by 1: untouched
    expected = (grad.float() * scale[:, None]).to(dtype)
    version = grad._version
    _C.scale_rows_(grad, scale)
    assert torch.equal(grad.isnan(), expected.isnan())
    assert torch.equal(grad.nan_to_num(), expected.nan_to_num())
    assert grad._version > version
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _C.scale_rows_(grad.double(), scale)
    with pytest.raises(RuntimeError, match="one value per row of grad"):
        _C.scale_rows_(grad, scale[:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_gradient_buffer_is_reused_and_rewritten_in_full(dtype):
    # Once autograd frees a CPU gradient of 32 MiB or more, the next call gets its buffer
    # (csrc/cpu_gradient.cpp), so every kernel must write all of it: the first gradient is
    # spoiled with NaN before it is freed, and the next, in the same buffer, must equal it. Rows
    # of an odd width start at every alignment, so the streaming stores' unaligned heads and
    # tails (csrc/cpu_rows.h) are covered.
    from nemo_anchored import _C
    from nemo_anchored.ops.vocab_parallel import (combine_softmax_stats,
                                                  combine_softmax_stats_and_mean)
    rows, itemsize = 9, torch.finfo(dtype).bits // 8
    cols = (40 << 20) // (rows * itemsize) | 1
    z, r = logits((rows, cols), dtype, seed=50), logits((rows, cols), dtype, seed=51)
    labels = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(52))
    lse = combine_softmax_stats(_C.row_stats(z, None, r, 0.5, 1.0, 0, None), None)
    lse_pair, mean_difference = combine_softmax_stats_and_mean(*_C.loss_stats(z, r, None), None)
    lse_policy = lse_pair[:, :1].contiguous()
    # With weights, the rows of weight 0 are skipped, and their gradient rows must be written
    # as zeros all the same.
    weights = torch.tensor([0.0, 1.0, 0.5, 0.0, 0.0, 2.0, 1.0, 0.0, 1.0])
    gradients = {
        "anchored, unsharded": lambda w: _C.fused(z, None, r, 0.5, 1.0, 0, True, w)[1],
        "anchored, sharded": lambda w: _C.kl_grad(z, None, r, lse, 0.5, 1.0, 0, True, w)[1],
        "cross-entropy, unsharded": lambda w: _C.cross_entropy_fused(z, labels, True, w)[1],
        "cross-entropy, sharded": lambda w: _C.cross_entropy_grad(z, labels, lse_policy, w),
        "reverse KL, unsharded": lambda w: _C.reverse_kl_fused(z, r, True, w)[1],
        "reverse KL, sharded": lambda w: _C.reverse_kl_grad(z, r, lse_pair, mean_difference,
                                                            True, w)[1],
    }
    for (name, kernel), w in itertools.product(gradients.items(), (None, weights)):
        name = f"{name}, {'weighted' if w is not None else 'unweighted'}"
        gradient = functools.partial(kernel, w)
        first = gradient()
        expected, buffer = first.clone(), first.data_ptr()
        first.fill_(math.nan)
        del first
        assert _C.idle_cpu_gradient_bytes() >= z.numel() * itemsize, name
        again = gradient()
        assert again.data_ptr() == buffer and _C.idle_cpu_gradient_bytes() == 0, name
        assert torch.equal(again, expected), name
        if w is not None:
            assert (again[w == 0] == 0).all(), name
        # While a gradient is alive, the next call gets a buffer of its own.
        other = gradient()
        assert other.data_ptr() != again.data_ptr() and torch.equal(other, expected), name
        del again, other


def test_no_gradient_needed():
    z, r = logits((3, 40)), logits((3, 40), seed=34)
    with torch.no_grad():
        loss = anchored_kl(z.clone().requires_grad_(), r)
    assert not loss.requires_grad
    assert max_row_relative_error(loss, anchored_kl_reference(z, r)[0]) <= 1e-5


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(reference=torch.zeros(3, 9)), "reference_logits has shape"),
    (dict(current=torch.zeros(3, 9)), "current_logits has shape"),
    (dict(reference=torch.zeros(3, 10, dtype=torch.float64)), "reference_logits has dtype"),
    (dict(current=torch.zeros(3, 10, dtype=torch.bfloat16)), "current_logits has dtype"),
    (dict(reference=torch.zeros(3, 10, device="meta")), "reference_logits is on meta"),
    (dict(alpha=0.0), "alpha must be"),
    (dict(alpha=1.5), "alpha must be"),
    (dict(alpha=-0.1), "alpha must be"),
    (dict(alpha=math.nan), "alpha must be"),
    (dict(alpha=True), "alpha must be"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=math.inf), "temperature must be"),
    (dict(interpolation="geometric"), "interpolation must be"),
    (dict(backend="cuda"), "backend must be"),
    (dict(policy=torch.zeros(3, 10, dtype=torch.int64)), "policy_logits must be"),
    (dict(policy=torch.zeros(3, 0)), "policy_logits must have"),
    (dict(policy=torch.zeros(3, 10, dtype=torch.float64), backend="fused"), "backend='fused'"),
])
@pytest.mark.parametrize("fn", [anchored_kl, anchor_diagnostics, anchored_kl_and_diagnostics])
def test_bad_arguments_raise_value_error(fn, kwargs, pattern):
    args = dict(policy=torch.zeros(3, 10), reference=torch.zeros(3, 10), current=None,
                alpha=0.5, interpolation="logit", temperature=1.0, backend="auto")
    args.update(kwargs)
    if "reference" not in kwargs:
        args["reference"] = torch.zeros_like(args["policy"])
    with pytest.raises(ValueError, match=pattern.replace("(", r"\(")):
        fn(args.pop("policy"), args.pop("reference"), current_logits=args.pop("current"),
           **args)


@pytest.mark.parametrize("weights,pattern", [
    (torch.ones(3, 1), r"weights has shape \(3, 1\), the loss \(3,\)"),
    (torch.ones(3, dtype=torch.int64), "weights must be a floating-point tensor"),
    ([1.0, 1.0, 1.0], "weights must be a floating-point tensor"),
    (torch.ones(3, device="meta"), "weights is on meta"),
])
@pytest.mark.parametrize("fn", [anchored_kl, anchored_kl_and_diagnostics])
def test_bad_weights_raise_value_error(fn, weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(torch.zeros(3, 10), torch.zeros(3, 10), weights=weights)
