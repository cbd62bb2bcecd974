"""Float64, full-vocabulary definitions the operator is checked against.

Written straight from the definitions (softmax, log-softmax, sum of q log(q / p)), with no
sharding and none of the operator's numerical rearrangements. Also the random logits the
operator tests share, and the operator's (loss, gradient) read the same way on every device.
"""
import math

import torch


def logits(shape, dtype=torch.float32, scale=3.0, seed=0, padded=0, device="cpu"):
    """Random logits (drawn in float64 on the CPU, so every device gets the same values); the
    last `padded` vocabulary columns are -inf (padded vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if padded:
        x[..., -padded:] = -math.inf
    return x.to(dtype=dtype, device=device)


def anchored_kl_loss_and_grad(policy, reference, current=None, weights=None, **kwargs):
    """(loss, d(sum(weights * loss)) / d policy) from the operator."""
    from nemo_anchored.ops import anchored_kl

    z = policy.clone().requires_grad_()
    loss = anchored_kl(z, reference, current_logits=current, **kwargs)
    weights = torch.ones_like(loss) if weights is None else weights
    (grad,) = torch.autograd.grad((loss * weights).sum(), z)
    return loss.detach(), grad


def anchor_log_probs(current, reference, alpha, interpolation, temperature=1.0):
    """log q over the full vocabulary, float64."""
    c = current.double() / temperature
    r = reference.double() / temperature
    if interpolation == "logit":
        a = r if alpha == 1 else (1 - alpha) * c + alpha * r
        return torch.log_softmax(a, dim=-1)
    q = (1 - alpha) * torch.softmax(c, dim=-1) + alpha * torch.softmax(r, dim=-1)
    return torch.log(q)


def kl(log_q, log_p):
    """KL(q || p) per row; columns with q == 0 contribute 0."""
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)


def anchored_kl_reference(policy, reference, current=None, alpha=0.5, interpolation="logit",
                          temperature=1.0):
    """(loss [...], d loss / d policy [..., V]) in float64: KL(q || p) and (p - q) / tau."""
    current = policy if current is None else current
    log_q = anchor_log_probs(current, reference, alpha, interpolation, temperature)
    log_p = torch.log_softmax(policy.double() / temperature, dim=-1)
    return kl(log_q, log_p), (log_p.exp() - log_q.exp()) / temperature


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def max_row_relative_error(actual, expected, floor=1e-12):
    """max over rows of |actual - expected| / max(|expected|, floor)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs() / expected.abs().clamp_min(floor)).max().item()
