"""Model adapters: what the evaluation loops call a model through, ``generate`` (greedy
continuations of prompt ids) and ``logprob`` (a continuation's summed log-probability), for a
megatron-core GPTModel (``MegatronLM``, through eval/generate.py) and for a transformers causal
LM (``TransformersLM``)."""
from __future__ import annotations

from typing import AbstractSet, List, Sequence


class _LastInputCache:
    """Keeps the log-probability rows of the last scored input: MMLU scores four one-token
    continuations of the same prompt, which share that input."""

    def __init__(self):
        self._key, self._rows = None, None

    def rows(self, prompt: Sequence[int], continuation: Sequence[int], compute):
        key = (tuple(prompt), tuple(continuation[:-1]))
        if key != self._key:
            self._key, self._rows = key, compute()
        return self._rows


def _sum_picked(rows, continuation: Sequence[int], vocab_size: int) -> float:
    import torch

    if not continuation:
        raise ValueError("logprob: empty continuation")
    if any(not 0 <= token < vocab_size for token in continuation):
        raise ValueError(f"logprob: a continuation id is outside the vocabulary "
                         f"[0, {vocab_size})")
    return float(rows[torch.arange(len(continuation)), torch.tensor(list(continuation))].sum())


class MegatronLM:
    """``generate`` and ``logprob`` over a megatron-core GPTModel at TP=1, PP=1.

    Inputs longer than the model's max_sequence_length are cut from the left (the end of a
    prompt, next to the answer, is kept) and counted in ``truncated``; the softmax covers the
    tokenizer's vocabulary (``vocab_size``) only.
    """

    def __init__(self, model, *, vocab_size: int, stop_ids: AbstractSet[int],
                 batch_size: int = 16):
        from nemo_anchored.eval.generate import model_max_length

        self.model, self.vocab_size, self.stop_ids = model, vocab_size, frozenset(stop_ids)
        self.batch_size = batch_size
        self.max_length = model_max_length(model)
        self.truncated = 0
        self._cache = _LastInputCache()

    def fit(self, ids: Sequence[int], room: int) -> List[int]:
        """``ids`` cut from the left to at most max_length - room tokens: a prompt as
        ``generate`` (room 1) and ``logprob`` feed it to the model."""
        if self.max_length is None or len(ids) + room <= self.max_length:
            return list(ids)
        return list(ids)[len(ids) + room - self.max_length:]

    def _fit(self, ids: Sequence[int], room: int) -> List[int]:
        fitted = self.fit(ids, room)
        self.truncated += len(fitted) < len(ids)
        return fitted

    def generate(self, prompts: List[List[int]], max_new_tokens: int) -> List[List[int]]:
        from nemo_anchored.eval.generate import greedy_generate_ids

        return greedy_generate_ids(self.model, [self._fit(p, 1) for p in prompts],
                                   vocab_size=self.vocab_size, stop_ids=self.stop_ids,
                                   max_new_tokens=max_new_tokens, batch_size=self.batch_size)

    def logprob(self, prompt: List[int], continuation: List[int]) -> float:
        from nemo_anchored.eval.generate import continuation_logprobs

        prompt = self._fit(prompt, len(continuation) - 1)
        rows = self._cache.rows(prompt, continuation, lambda: continuation_logprobs(
            self.model, prompt, continuation, vocab_size=self.vocab_size))
        return _sum_picked(rows, continuation, self.vocab_size)


class TransformersLM:
    """``generate`` and ``logprob`` over a transformers causal LM: transformers' own greedy
    ``generate`` (stopping at ``stop_ids``, never choosing ids >= ``vocab_size``) and its
    logits, with float64 log-softmax over the first ``vocab_size`` columns. Prompts are
    generated ``batch_size`` at a time, left-padded, in order of length so that a batch pads
    little."""

    def __init__(self, model, *, vocab_size: int, stop_ids: AbstractSet[int],
                 batch_size: int = 16):
        self.model, self.vocab_size, self.stop_ids = model.eval(), vocab_size, frozenset(stop_ids)
        self.batch_size = batch_size
        self._cache = _LastInputCache()

    @property
    def _device(self):
        return next(self.model.parameters()).device

    def generate(self, prompts: List[List[int]], max_new_tokens: int) -> List[List[int]]:
        import torch

        pad = min(self.stop_ids)
        extra_columns = range(self.vocab_size, self.model.config.vocab_size)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: List[List[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            batch = [prompts[i] for i in order[start:start + self.batch_size]]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch],
                                     device=self._device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p)
                                           for p in batch], device=self._device)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=sorted(self.stop_ids), pad_token_id=pad,
                    suppress_tokens=list(extra_columns) or None)
            for index, row in zip(order[start:start + self.batch_size], out[:, width:].tolist()):
                stops = [i for i, token in enumerate(row) if token in self.stop_ids]
                outputs[index] = row[:stops[0]] if stops else row
        return outputs

    def logprob(self, prompt: List[int], continuation: List[int]) -> float:
        import torch

        def compute():
            ids = torch.tensor([[*prompt, *continuation[:-1]]], device=self._device)
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits[0, len(prompt) - 1:]
            return torch.log_softmax(logits[:, :self.vocab_size].double().cpu(), dim=-1)

        return _sum_picked(self._cache.rows(prompt, continuation, compute), continuation,
                           self.vocab_size)
