"""Greedy decoding and exact-match accuracy for a megatron-core GPTModel at TP=1, PP=1.

Tiny models only: every new token is one full forward over the whole sequence (no KV cache).
Prompts are grouped by length, so a batch needs neither padding nor an attention mask (the
model's causal mask is all there is). A prompt is encoded as training sees it:
``[bos] + encode(prompt)``; the continuation stops at eos or after ``max_new_tokens``.
Padded vocabulary columns (``V_padded > tokenizer.vocab_size``) are set to -inf before the
argmax, so they are never chosen.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Sequence

import torch

from nemo_anchored.models.gpt import mask_padded_vocab


def _check_layout() -> None:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() != 1 or \
            ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("greedy_generate needs TP=1 and PP=1 (full logits on one rank)")


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16,
                    batch_size: int = 64) -> List[List[int]]:
    """The greedy continuation (token ids, without the eos) of each prompt, in order."""
    _check_layout()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = tokenizer.vocab_size
    max_len = getattr(getattr(model, "rotary_pos_emb", None), "max_sequence_length", None)
    max_len = getattr(model, "max_sequence_length", None) or max_len
    by_length: Dict[int, List[int]] = defaultdict(list)
    encoded = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    outputs: List[List[int]] = [[] for _ in prompts]
    try:
        for length, members in sorted(by_length.items()):
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                tokens = torch.tensor([encoded[i] for i in rows], dtype=torch.long,
                                      device=device)
                done = torch.zeros(len(rows), dtype=torch.bool, device=device)
                for _ in range(max_new_tokens):
                    if max_len is not None and tokens.shape[1] >= max_len:
                        break
                    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
                    logits = model(tokens, positions, None)[:, -1, :].float()
                    logits = mask_padded_vocab(logits, vocab)
                    nxt = logits.argmax(dim=-1)
                    for j in range(len(rows)):
                        if not done[j]:
                            if int(nxt[j]) == tokenizer.eos_id:
                                done[j] = True
                            else:
                                outputs[rows[j]].append(int(nxt[j]))
                    if bool(done.all()):
                        break
                    tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    finally:
        model.train(was_training)
    return outputs


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
