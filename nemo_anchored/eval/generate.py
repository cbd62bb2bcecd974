"""Greedy decoding, continuation log-likelihoods and exact-match accuracy for a megatron-core
GPTModel at TP=1, PP=1.

Generation keeps keys and values in megatron-core's static KV cache (StaticInferenceContext):
one forward over the prompts, then one single-token forward per new token. Prompts are grouped
by length, so a batch needs neither padding nor an attention mask (the model's causal mask is
all there is). A prompt is encoded with ``tokenizer.encode_prompt`` (the ids a model continues
to produce the assistant turn; the byte tokenizer's is ``[bos] + encode(prompt)``); the
continuation stops at any of ``tokenizer.stop_ids`` (not included) or after ``max_new_tokens``,
or when the sequence reaches the model's ``max_sequence_length``. Logit columns at or beyond the
tokenizer's vocabulary (the padded vocabulary, and any model rows the tokenizer has no token
for) are never chosen and carry no probability.
"""
from __future__ import annotations

from collections import defaultdict
from typing import AbstractSet, Dict, List, Mapping, Optional, Sequence

import torch


def _check_layout() -> None:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() != 1 or \
            ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("generation and scoring need TP=1 and PP=1 (full logits on one rank)")


def model_max_length(model) -> Optional[int]:
    """The longest sequence ``model`` was built for (None when it does not say)."""
    max_len = getattr(getattr(model, "rotary_pos_emb", None), "max_sequence_length", None)
    return getattr(model, "max_sequence_length", None) or max_len


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_generate_ids(model, prompts: Sequence[Sequence[int]], *, vocab_size: int,
                        stop_ids: AbstractSet[int], max_new_tokens: int = 16,
                        batch_size: int = 64) -> List[List[int]]:
    """The greedy continuation (token ids, without the stop token) of each prompt's ids, in
    order. Columns ``>= vocab_size`` are never chosen."""
    _check_layout()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: an empty prompt (the model needs at least one token)")
    was_training = model.training
    model.eval()
    device = _device(model)
    max_len = model_max_length(model)
    by_length: Dict[int, List[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    outputs: List[List[int]] = [[] for _ in prompts]
    try:
        for length, members in sorted(by_length.items()):
            # New tokens are produced while the sequence is shorter than the model's maximum.
            budget = max_new_tokens if max_len is None else min(max_new_tokens, max_len - length)
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                prompt = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long,
                                      device=device)
                for j, new in enumerate(_greedy_batch(model, prompt, budget, vocab_size,
                                                      stop_ids)):
                    outputs[rows[j]] = new
    finally:
        model.train(was_training)
    return outputs


def _greedy_batch(model, prompt: torch.Tensor, budget: int, vocab_size: int,
                  stop_ids: AbstractSet[int]) -> List[List[int]]:
    """Greedy continuations of equal-length prompts ``[batch, length]``, at most ``budget``
    tokens each, through megatron's static KV cache."""
    # Imported here: megatron (and its CPU shims) load only once a model is used.
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_anchored.models.gpt import mask_padded_vocab

    batch, length = prompt.shape
    new: List[List[int]] = [[] for _ in range(batch)]
    if budget <= 0:
        return new
    cache = StaticInferenceContext(batch, length + budget)
    tokens, positions = prompt, torch.arange(length, device=prompt.device).expand(batch, length)
    done = [False] * batch
    for _ in range(budget):
        logits = model(tokens, positions, None, inference_context=cache,
                       runtime_gather_output=True)[:, -1, :].float()
        cache.sequence_len_offset += tokens.shape[1]
        cache.enable_decode_mode()
        nxt = mask_padded_vocab(logits, vocab_size).argmax(dim=-1)
        for j, token in enumerate(nxt.tolist()):
            if not done[j]:
                done[j] = token in stop_ids
                if not done[j]:
                    new[j].append(token)
        if all(done):
            break
        tokens, positions = nxt[:, None], positions[:, -1:] + 1
    return new


def greedy_generate(model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 16,
                    batch_size: int = 64) -> List[List[int]]:
    """The greedy continuation (token ids, without the stop token) of each prompt (a str or a
    message list, encoded with ``tokenizer.encode_prompt``), in order."""
    return greedy_generate_ids(model, [tokenizer.encode_prompt(p) for p in prompts],
                               vocab_size=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)


@torch.no_grad()
def continuation_logprobs(model, prompt_ids: Sequence[int], continuation_ids: Sequence[int], *,
                          vocab_size: int) -> torch.Tensor:
    """float64 log-probabilities ``[len(continuation), vocab_size]`` of the positions that
    predict each continuation token, teacher-forced: one forward over ``prompt +
    continuation[:-1]``. The softmax covers the first ``vocab_size`` columns only."""
    _check_layout()
    if not prompt_ids or not continuation_ids:
        raise ValueError("continuation_logprobs: the prompt and the continuation must each "
                         "have at least one token")
    ids = [*prompt_ids, *continuation_ids[:-1]]
    max_len = model_max_length(model)
    if max_len is not None and len(ids) > max_len:
        raise ValueError(f"continuation_logprobs: {len(ids)} input tokens exceed the model's "
                         f"max_sequence_length {max_len}")
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        positions = torch.arange(len(ids), device=device)[None]
        logits = model(tokens, positions, None)[0, len(prompt_ids) - 1:]
    finally:
        model.train(was_training)
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"continuation_logprobs: the model has {logits.shape[-1]} logit "
                         f"columns, fewer than the vocabulary's {vocab_size}")
    return torch.log_softmax(logits[:, :vocab_size].double().cpu(), dim=-1)


def exact_match(model, tokenizer, examples: Sequence[Mapping[str, str]], *,
                max_new_tokens: int = 16, by_task: bool = False):
    """Fraction of ``examples`` ({"prompt", "response"}) whose greedy continuation decodes to
    exactly the response. With ``by_task``: ``(accuracy, {task: accuracy})`` using each
    example's "task" key."""
    if not examples:
        raise ValueError("exact_match: no examples")
    outs = greedy_generate(model, tokenizer, [e["prompt"] for e in examples],
                           max_new_tokens=max_new_tokens)
    hits = [tokenizer.decode(o) == e["response"] for o, e in zip(outs, examples)]
    accuracy = sum(hits) / len(hits)
    if not by_task:
        return accuracy
    tasks: Dict[str, List[bool]] = defaultdict(list)
    for hit, e in zip(hits, examples):
        tasks[e.get("task", "all")].append(hit)
    return accuracy, {t: sum(h) / len(h) for t, h in sorted(tasks.items())}
