"""How far a model moved from a reference distribution: teacher-forced log-probs on a batch and
the mean per-token KL(model || reference) over the batch's loss positions (TP=1, PP=1 models).

Computed in float64 over the full (unpadded) vocabulary; the forgetting lab uses it for
KL(p_theta || p_base) on the general held-out set.
"""
from __future__ import annotations

from typing import Mapping

import torch


@torch.no_grad()
def response_logprobs(model, batch: Mapping[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """float64 log-probs ``[b, s, vocab_size]`` of ``model`` at every position of ``batch``
    (``tokens``, ``position_ids``); padded vocabulary columns are dropped."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(batch["tokens"].to(device), batch["position_ids"].to(device), None)
    finally:
        model.train(was_training)
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"response_logprobs: the model has {logits.shape[-1]} logit columns, "
                         f"fewer than the vocabulary's {vocab_size} (vocab-sharded logits?)")
    return torch.log_softmax(logits[..., :vocab_size].double().cpu(), dim=-1)


def mean_kl(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over positions with ``mask`` = 1 of KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    if logp.shape != logq.shape or logp.shape[:-1] != mask.shape:
        raise ValueError(f"mean_kl: shapes {tuple(logp.shape)}, {tuple(logq.shape)} and mask "
                         f"{tuple(mask.shape)} do not match")
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    weights = mask.double()
    if weights.sum() == 0:
        raise ValueError("mean_kl: the mask selects no position")
    return float((per_token * weights).sum() / weights.sum())
