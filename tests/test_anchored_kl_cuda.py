"""The CUDA kernels of anchored_kl against float64 full-vocabulary math, on a GPU.

CPU-only machines (CI) skip this module: there the CUDA kernels are only compiled
(tests/test_cuda_compile.py). On a GPU machine `pytest tests/test_anchored_kl_cuda.py` runs the
fused CUDA path and the torch backend on the device across modes, dtypes and vocabularies.
"""
import functools
import itertools
import math

import pytest
import torch

from nemo_anchored.ops import anchor_diagnostics, anchored_kl, fused_available
from tests.reference import anchored_kl_loss_and_grad as run
from tests.reference import anchored_kl_reference, max_row_relative_error, relative_error
from tests.reference import logits as reference_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ["torch", "fused"]


def test_extension_has_cuda_kernels():
    assert fused_available("cuda"), "nemo_anchored._C was built without its CUDA kernels"


logits = functools.partial(reference_logits, device="cuda")


CASES = list(itertools.product(["logit", "prob"], ["live", "snapshot"], [1.0, 0.7]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation,mode,temperature", CASES)
@pytest.mark.parametrize("vocab", [1003, 32000, 151936])
def test_fp32_matches_float64_reference(backend, interpolation, mode, temperature, vocab):
    shape = (6, vocab)
    z, r = logits(shape, seed=1), logits(shape, seed=2)
    c = logits(shape, seed=3) if mode == "snapshot" else None
    weights = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(4)).cuda()
    loss, grad = run(z, r, c, weights, alpha=0.3, interpolation=interpolation,
                     temperature=temperature, backend=backend)
    ref_loss, ref_grad = anchored_kl_reference(z.cpu(), r.cpu(), None if c is None else c.cpu(),
                                               0.3, interpolation, temperature)
    assert loss.is_cuda and grad.is_cuda and grad.dtype == torch.float32
    assert max_row_relative_error(loss.cpu(), ref_loss) <= 1e-5
    assert relative_error(grad.cpu(), ref_grad * weights.cpu()[..., None].double()) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation,mode", [("logit", "live"), ("logit", "snapshot"),
                                                ("prob", "live"), ("prob", "snapshot")])
@pytest.mark.parametrize("alpha", [0.5, 0.01])
def test_bf16_matches_float64_reference(backend, interpolation, mode, alpha):
    shape = (256, 49152)
    z, r = logits(shape, torch.bfloat16, seed=5), logits(shape, torch.bfloat16, seed=6)
    c = logits(shape, torch.bfloat16, seed=7) if mode == "snapshot" else None
    loss, grad = run(z, r, c, alpha=alpha, interpolation=interpolation, temperature=1.3,
                     backend=backend)
    ref_loss, ref_grad = anchored_kl_reference(z.cpu(), r.cpu(), None if c is None else c.cpu(),
                                               alpha, interpolation, 1.3)
    assert grad.dtype == torch.bfloat16
    assert max_row_relative_error(loss.cpu(), ref_loss) <= 1e-3
    assert relative_error(grad.cpu(), ref_grad) <= 1e-2


def test_cuda_kernels_agree_with_the_cpu_kernels():
    shape = (33, 5000)
    z, r, c = (logits(shape, seed=s) for s in (10, 11, 12))
    for interpolation in ("logit", "prob"):
        gpu = run(z, r, c, alpha=0.4, interpolation=interpolation, backend="fused")
        cpu = run(z.cpu(), r.cpu(), c.cpu(), alpha=0.4, interpolation=interpolation,
                  backend="fused")
        assert max_row_relative_error(gpu[0].cpu(), cpu[0]) <= 1e-5
        assert relative_error(gpu[1].cpu(), cpu[1]) <= 1e-5


def check_weights_agree_with_the_cpu_kernels(loss, z, weights):
    """loss(z on a device, weights on it).sum() and its gradient on CUDA and on the CPU, z with
    a NaN at a token of weight 0. The CUDA kernels take no weights: their gradient is weighed
    after them (vocab_parallel's weigh_gradient), to the same result as the CPU kernels that take
    them, 0 at weight 0 even for NaN logits."""
    z = z.clone()
    dropped = weights == 0
    z[dropped.nonzero()[0, 0], 10] = math.nan
    results = []
    for device in ("cuda", "cpu"):
        zz = z.to(device).requires_grad_()
        value = loss(zz, weights.to(device))
        value.sum().backward()
        results.append((value.detach().cpu(), zz.grad.cpu()))
    (gpu_loss, gpu_grad), (cpu_loss, cpu_grad) = results
    assert (gpu_loss[dropped] == 0).all() and (gpu_grad[dropped] == 0).all()
    assert max_row_relative_error(gpu_loss, cpu_loss) <= 1e-5
    assert relative_error(gpu_grad, cpu_grad) <= 1e-5


@pytest.mark.parametrize("interpolation,mode", [("logit", "live"), ("prob", "snapshot")])
def test_weights_in_the_forward_agree_with_the_cpu_kernels(interpolation, mode):
    z, r, c = (logits((33, 5000), seed=s).cpu() for s in (15, 16, 17))
    c = c if mode == "snapshot" else None
    weights = torch.rand(33, generator=torch.Generator().manual_seed(18)) + 0.5
    weights[::3] = 0.0

    def loss(zz, w):
        return anchored_kl(zz, r.to(zz.device),
                           current_logits=None if c is None else c.to(zz.device), alpha=0.4,
                           interpolation=interpolation, backend="fused", weights=w)

    check_weights_agree_with_the_cpu_kernels(loss, z, weights)


def test_padded_columns_and_non_finite_rows():
    z, r = logits((4, 4096), seed=13), logits((4, 4096), seed=14)
    z[:, 4000:] = float("-inf")  # padded vocabulary: no mass on either side
    r[:, 4000:] = float("-inf")
    z[2, 7] = math.nan
    loss, grad = run(z, r, alpha=0.5, backend="fused")
    ref_loss, ref_grad = anchored_kl_reference(z[[0, 1, 3]].cpu(), r[[0, 1, 3]].cpu(), None, 0.5)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert max_row_relative_error(loss[[0, 1, 3]].cpu(), ref_loss) <= 1e-5
    assert relative_error(grad[[0, 1, 3]].cpu(), ref_grad) <= 1e-5
    assert (grad[[0, 1, 3]][:, 4000:] == 0).all()


@pytest.mark.parametrize("interpolation", ["logit", "prob"])
def test_diagnostics_match_between_backends(interpolation):
    z, r, c = (logits((16, 8192), seed=s) for s in (20, 21, 22))
    fused = anchor_diagnostics(z, r, current_logits=c, alpha=0.5, interpolation=interpolation,
                               backend="fused")
    plain = anchor_diagnostics(z, r, current_logits=c, alpha=0.5, interpolation=interpolation,
                               backend="torch")
    for key in ("anchor_step_kl", "bound", "kl_cur_ref", "entropy"):
        assert max_row_relative_error(fused[key].cpu(), plain[key].cpu()) <= 1e-4, key
    assert (fused["anchor_step_kl"] <= fused["bound"] * (1 + 1e-5)).all()
