"""The CUDA kernels of token_cross_entropy and reverse_kl against float64 full-vocabulary math,
on a GPU.

CPU-only machines (CI) skip this module: there the CUDA kernels are only compiled
(tests/test_cuda_compile.py). On a GPU machine `pytest tests/test_sharded_losses_cuda.py` runs
the fused CUDA path and the torch kernels on the device, and the kernels of the TP > 1 path
on one shard that is the whole row.
"""
import math

import pytest
import torch

from nemo_anchored.ops import fused_available
from tests.reference import max_row_relative_error, relative_error
from tests.test_anchored_kl_cuda import check_weights_agree_with_the_cpu_kernels
from tests.test_sharded_losses import OPS, TOLERANCES, check_sharded_passes, inputs, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_extension_has_cuda_kernels():
    assert fused_available("cuda"), "nemo_anchored._C was built without its CUDA kernels"


def run_cuda(op, z, other, weights, backend):
    zz = z.cuda().requires_grad_()
    loss = OPS[op](zz, other.cuda(), backend=backend)
    (grad,) = torch.autograd.grad((loss * weights.cuda()).sum(), zz)
    assert loss.is_cuda and grad.is_cuda
    return loss.detach().cpu(), grad.cpu()


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1003, 32000, 151936])  # 1003: rows not 16-byte aligned
@pytest.mark.parametrize("op", OPS)
def test_matches_float64_reference(op, vocab, dtype, backend):
    z, other, weights = inputs(op, (6, vocab), dtype, seed=1, padded=11)
    loss, grad = run_cuda(op, z, other, weights, backend)
    ref_loss, ref_grad = reference(op, z, other, weights)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert grad.dtype == dtype
    assert max_row_relative_error(loss, ref_loss) <= loss_tol
    assert relative_error(grad, ref_grad) <= grad_tol
    assert (grad[:, -11:] == 0).all()


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_agree_with_the_cpu_kernels(op):
    z, other, weights = inputs(op, (33, 5000), seed=2, padded=8)
    gpu = run_cuda(op, z, other, weights, "fused")
    zz = z.clone().requires_grad_()
    loss = OPS[op](zz, other, backend="fused")
    (grad,) = torch.autograd.grad((loss * weights).sum(), zz)
    assert max_row_relative_error(gpu[0], loss.detach()) <= 1e-5
    assert relative_error(gpu[1], grad) <= 1e-5


@pytest.mark.parametrize("op", OPS)
def test_weights_in_the_forward_agree_with_the_cpu_kernels(op):
    z, other, weights = inputs(op, (33, 5000), seed=3, padded=8)
    weights[::3] = 0.0
    check_weights_agree_with_the_cpu_kernels(
        lambda zz, w: OPS[op](zz, other.to(zz.device), backend="fused", weights=w), z, weights)


@pytest.mark.parametrize("op", OPS)
def test_sharded_passes_match_the_unsharded_call(op):
    check_sharded_passes(op, "cuda")


@pytest.mark.parametrize("op", OPS)
def test_non_finite_rows(op):
    z, other, weights = inputs(op, (4, 4096), seed=4, padded=7)
    z[2, 7] = math.nan
    loss, grad = run_cuda(op, z, other, weights, "fused")
    ref_loss, ref_grad = reference(op, z[[0, 1, 3]], other[[0, 1, 3]], weights[[0, 1, 3]])
    assert torch.isnan(loss[2]) and torch.isnan(grad[2, :-7]).all()
    assert max_row_relative_error(loss[[0, 1, 3]], ref_loss) <= 1e-5
    assert relative_error(grad[[0, 1, 3]], ref_grad) <= 1e-5
