"""Greedy decoding, continuation log-likelihoods and exact-match accuracy for a megatron-core
GPTModel at TP=1, PP=1.

Generation keeps keys and values in megatron-core's static KV cache (StaticInferenceContext):
one forward over the prompts, then one single-token forward per new token. Prompts are sorted by
length and batched ``batch_size`` at a time, LEFT-padded to the batch's longest, with an
attention mask (megatron's convention: bool ``[b, 1, s_q, s_kv]``, True = not attended) that
keeps every real token from attending to its row's pads, in the prompt forward and in every
decoding step; pads attend causally to pads only, so no softmax row is empty. A padded row's
rotary positions are shifted by its pad count: megatron's GPTModel rotates by cache slot, not
by ``position_ids``, under a KV cache. RoPE scores depend on position differences only, so the
shift changes nothing but rounding: in fp32, padded rows' logits were within 3e-5 of one
prompt at a time with up to 24 pads and 7e-5 with 170 (logits up to ~10), against 1.3e-5 with
per-row rotary positions from 0, which would need megatron's rotary path changed; unpadded
batching alone moves them by about as much (tests/test_benchmarks.py, the KV-cache checks).

Padding needs a core attention that applies a given mask in the prompt forward: megatron's
local ``DotProductAttention`` (its fused softmax off, megatron's default) and
``models.attention.SDPAttention`` do; Transformer Engine's runs its causal mask type and ignores
it. For any other attention, prompts are batched among prompts of equal length only (no pads,
no mask).

A prompt is encoded with ``tokenizer.encode_prompt`` (the ids a model continues to produce the
assistant turn; the byte tokenizer's is ``[bos] + encode(prompt)``); the continuation stops at
any of ``tokenizer.stop_ids`` (not included) or after ``max_new_tokens``, or when the sequence
reaches the model's ``max_sequence_length``. Logit columns at or beyond the tokenizer's
vocabulary (the padded vocabulary, and any model rows the tokenizer has no token for) are never
chosen and carry no probability.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from typing import AbstractSet, Dict, List, Mapping, Optional, Sequence

import torch

PAD_ID = 0  # what fills a row's pad positions: any valid id, as no real token attends to them


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


def masks_padding(model) -> bool:
    """Whether every core attention of ``model`` applies a given attention mask in the prompt
    forward, which left padding needs (module docstring)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemo_anchored.models.attention import SDPAttention

    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    return bool(cores) and all(
        isinstance(core, SDPAttention) or
        (isinstance(core, DotProductAttention) and not core.config.masked_softmax_fusion)
        for core in cores)


def generation_batches(lengths: Sequence[int], batch_size: int, pad: bool) -> List[List[int]]:
    """Indices of prompts of ``lengths``, sorted by length and cut into batches of at most
    ``batch_size``; without ``pad``, a batch holds prompts of one length only."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups = [order] if pad else [list(g) for _, g in
                                  itertools.groupby(order, key=lambda i: lengths[i])]
    return [group[start:start + batch_size] for group in groups
            for start in range(0, len(group), batch_size)]


@torch.no_grad()
def greedy_generate_ids(model, prompts: Sequence[Sequence[int]], *, vocab_size: int,
                        stop_ids: AbstractSet[int], max_new_tokens: int = 16,
                        batch_size: int = 64) -> List[List[int]]:
    """The greedy continuation (token ids, without the stop token) of each prompt's ids, in
    order. Columns ``>= vocab_size`` are never chosen."""
    _check_layout()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: an empty prompt (the model needs at least one token)")
    max_len = model_max_length(model)
    # New tokens are produced while the sequence is shorter than the model's maximum.
    budgets = [max_new_tokens if max_len is None else min(max_new_tokens, max_len - len(p))
               for p in prompts]
    live = [i for i, budget in enumerate(budgets) if budget > 0]
    outputs: List[List[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for rows in generation_batches([len(prompts[i]) for i in live], batch_size,
                                       pad=masks_padding(model)):
            rows = [live[r] for r in rows]
            news = greedy_batch(model, [prompts[i] for i in rows], [budgets[i] for i in rows],
                                vocab_size=vocab_size, stop_ids=stop_ids)
            for i, new in zip(rows, news):
                outputs[i] = new
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def greedy_batch(model, prompts: Sequence[Sequence[int]], budgets: Sequence[int], *,
                 vocab_size: int, stop_ids: AbstractSet[int],
                 step_logits: Optional[List[torch.Tensor]] = None) -> List[List[int]]:
    """Greedy continuations of one batch of prompts (left-padded when their lengths differ),
    at most ``budgets[j]`` tokens for prompt j, through megatron's static KV cache. The model
    must be in eval mode. ``step_logits``, when given, receives each step's float32 next-token
    logits ``[batch, columns]`` (padded columns at -inf), the rows in ``prompts``' order: for
    checks, as it keeps every step's logits."""
    # Imported here: megatron (and its CPU shims) load only once a model is used.
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_anchored.models.gpt import mask_padded_vocab

    batch, device = len(prompts), _device(model)
    new: List[List[int]] = [[] for _ in range(batch)]
    done = [budget <= 0 for budget in budgets]
    if all(done):  # (also no prompt at all)
        return new
    width, steps = max(len(p) for p in prompts), max(budgets)
    padded = any(len(p) != width for p in prompts)
    if padded and not masks_padding(model):
        raise ValueError("greedy_batch: prompts of unequal length need left padding, which "
                         "this model's core attention would not mask (module docstring)")
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    slots = torch.arange(width + steps, device=device)
    # Each row's own position ids, from 0 at its first real token (what learned absolute
    # embeddings would read; the rotary embedding follows the cache slot).
    positions = (slots[None, :] - pads[:, None]).clamp(min=0)
    is_pad = slots[None, :] < pads[:, None]
    tokens = torch.tensor([[PAD_ID] * (width - len(p)) + list(p) for p in prompts],
                          dtype=torch.long, device=device)
    cache = StaticInferenceContext(batch, width + steps)
    start, end = 0, width
    while True:
        mask = None
        if padded:
            causal = slots[None, :end] > slots[start:end, None]  # [s_q, s_kv]
            real_to_pad = is_pad[:, None, :end] & ~is_pad[:, start:end, None]  # [b, s_q, s_kv]
            mask = (causal[None] | real_to_pad)[:, None]
        logits = model(tokens, positions[:, start:end], mask, inference_context=cache,
                       runtime_gather_output=True)[:, -1, :].float()
        cache.sequence_len_offset += end - start
        cache.enable_decode_mode()
        logits = mask_padded_vocab(logits, vocab_size)
        if step_logits is not None:
            step_logits.append(logits)
        nxt = logits.argmax(dim=-1)
        for j, token in enumerate(nxt.tolist()):
            if not done[j]:
                if token in stop_ids:
                    done[j] = True
                else:
                    new[j].append(token)
                    done[j] = len(new[j]) >= budgets[j]
        if all(done):
            return new
        tokens, start, end = nxt[:, None], end, end + 1


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
