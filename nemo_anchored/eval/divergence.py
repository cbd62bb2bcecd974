"""How far a model moved from a reference distribution (TP=1, PP=1 models), in float64 over the
full (unpadded) vocabulary:

- ``response_logprobs`` and ``mean_kl``: teacher-forced log-probs on a batch and the mean
  per-token KL(model || reference) over its loss positions (the tiny forgetting lab's
  KL(p_theta || p_base) on its general held-out set);
- ``kl_on_base_responses``: the drift measure Anchored Learning is about, KL(p_theta || p_base)
  per token on general prompts, teacher-forced on the BASE model's own greedy responses (from
  ``eval.generate.greedy_generate_ids``, generated once), with both models resident.
"""
from __future__ import annotations

from typing import List, Mapping, Sequence

import torch

from nemo_anchored.eval.generate import generation_batches, model_max_length


def _logprobs64(logits: torch.Tensor, vocab_size: int, caller: str) -> torch.Tensor:
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"{caller}: the model has {logits.shape[-1]} logit columns, fewer than "
                         f"the vocabulary's {vocab_size} (vocab-sharded logits?)")
    return torch.log_softmax(logits[..., :vocab_size].double(), dim=-1)


@torch.no_grad()
def response_logprobs(model, batch: Mapping[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """float64 log-probs ``[b, s, vocab_size]`` of ``model`` at every position of ``batch``
    (``tokens``, ``position_ids``), on the CPU; padded vocabulary columns are dropped."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(batch["tokens"].to(device), batch["position_ids"].to(device), None)
    finally:
        model.train(was_training)
    return _logprobs64(logits.cpu(), vocab_size, "response_logprobs")


def token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) at every position of log-probs ``[..., V]``."""
    return (logp.exp() * (logp - logq)).sum(-1)


def mean_kl(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over positions with ``mask`` = 1 of KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    if logp.shape != logq.shape or logp.shape[:-1] != mask.shape:
        raise ValueError(f"mean_kl: shapes {tuple(logp.shape)}, {tuple(logq.shape)} and mask "
                         f"{tuple(mask.shape)} do not match")
    weights = mask.double()
    if weights.sum() == 0:
        raise ValueError("mean_kl: the mask selects no position")
    return float((token_kl(logp, logq) * weights).sum() / weights.sum())


@torch.no_grad()
def kl_on_base_responses(model, base, prompts: Sequence[Sequence[int]],
                         responses: Sequence[Sequence[int]], *, vocab_size: int,
                         batch_size: int = 8) -> float:
    """Mean per-token KL(p_model || p_base) over the base's greedy ``responses`` to ``prompts``
    (token ids; a response without its stop token, as ``greedy_generate_ids`` returns it).

    Each sequence ``prompt + response`` is teacher-forced through both models; a response of n
    tokens contributes the n + 1 positions from the prompt's last token on: those that predict
    its tokens and the one after them (where the base stopped, or would go on), so an empty
    response still counts once. The mean is over all such positions of all prompts.
    ``batch_size`` sequences share a forward (right-padded: under the causal mask no scored
    position sees a pad); the KL is computed on the models' device.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"kl_on_base_responses: {len(prompts)} prompts but {len(responses)} "
                         "responses")
    if not prompts:
        raise ValueError("kl_on_base_responses: no prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("kl_on_base_responses: an empty prompt (the model needs at least one "
                         "token)")
    sequences = [[*p, *r] for p, r in zip(prompts, responses)]
    for net, name in ((model, "model"), (base, "base")):
        max_len = model_max_length(net)
        too_long = [i for i, s in enumerate(sequences) if max_len and len(s) > max_len]
        if too_long:
            raise ValueError(f"kl_on_base_responses: prompt + response {too_long[0]} has "
                             f"{len(sequences[too_long[0]])} tokens, more than the {name}'s "
                             f"max_sequence_length {max_len}")
    states = [(net, net.training) for net in (model, base)]
    for net, _ in states:
        net.eval()
    total, count = 0.0, 0
    try:
        for rows in generation_batches([len(s) for s in sequences], batch_size, pad=True):
            scored = [range(len(prompts[i]) - 1, len(sequences[i])) for i in rows]
            logp, logq = (_scored_logprobs(net, [sequences[i] for i in rows], scored, vocab_size)
                          for net in (model, base))
            total += float(token_kl(logp, logq).sum())
            count += logp.shape[0]
    finally:
        for net, was_training in states:
            net.train(was_training)
    return total / count


def _scored_logprobs(model, sequences: List[List[int]], scored: List[range],
                     vocab_size: int) -> torch.Tensor:
    """float64 log-probs ``[sum of len(scored), vocab_size]`` of ``model`` at the ``scored``
    positions of each sequence, from one forward over the right-padded batch."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)
    positions = torch.arange(width, device=device).expand_as(tokens)
    logits = model(tokens, positions, None)
    rows = torch.cat([logits[j, list(r)] for j, r in enumerate(scored)])
    return _logprobs64(rows, vocab_size, "kl_on_base_responses")
