"""Validation: the method's loss, and its per-token metrics, over a held-out set every
trainer.eval_interval steps and after the last step.

The set is data.valid_path (read like data.train_path), or a data.valid_fraction of the
training file's examples, chosen by trainer.seed and taken out of the data set before the
training order is built, so no held-out example is ever trained on; the same file and seed
(the sft and anchor stages of a recipe) hold out the same examples.

A validation pass runs the trainer's own forward path (megatron's schedule, forward only,
models in eval mode, so no dropout) over the whole set, each data-parallel rank taking an
equal contiguous slice, and reduces its sums as a training step does: every number is per
response token of the whole set, whatever the TP/PP/DP layout. The anchored method's
diagnostics (KL to the reference, the trust-region check) are computed on every pass. It draws
no random numbers and does not touch the data order, so a run trains exactly as it would
without validation, and a resume continues exactly.

The stm baseline's loss keeps the response tokens whose base-model perplexity is under the
threshold: for the held-out set that filter is computed once from the base model, as for the
training set.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from nemo_anchored.data import DataError, SFTDataset, cached_sft_dataset
from nemo_anchored.data.sft import PackedSFTDataset, pack_examples
from nemo_anchored.training.methods import MethodLoss

Batches = List[Dict[str, torch.Tensor]]


class Rows:
    """The examples ``rows`` of ``dataset`` as a data set numbered 0..len-1, sharing its
    arrays (memory-mapped from the data cache) instead of copying them."""

    def __init__(self, dataset: SFTDataset, rows: np.ndarray):
        self.dataset, self.rows = dataset, rows
        self.report = dataset.report

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def seq_length(self) -> int:
        return self.dataset.seq_length

    def batch(self, index: Sequence[int]) -> Dict[str, torch.Tensor]:
        """``SFTDataset.batch`` of these rows, with ``index`` numbering them in this set."""
        index = torch.as_tensor(index, dtype=torch.int64)
        batch = self.dataset.batch(self.rows[index.numpy()])
        batch["index"] = index
        return batch

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.batch(range(len(self)))["loss_mask"]

    def packed(self) -> PackedSFTDataset:
        """These examples, packed into seq_length rows (data.packing)."""
        return pack_examples(self.dataset, self.rows)


def hold_out(dataset: SFTDataset, fraction: float, seed: int) -> Tuple[Rows, Rows]:
    """(training rows, held-out rows): round(fraction x N) examples drawn by ``seed``, each
    part in file order. DataError naming data.valid_fraction when a part would be empty."""
    n = len(dataset)
    k = round(fraction * n)
    if not 0 < k < n:
        raise DataError(f"data.valid_fraction: {fraction} of the {n} examples of "
                        f"{dataset.report.path} holds out {k}: each of training and validation "
                        "needs at least one")
    # Hashed, so that the held-out draw shares no stream with the epoch permutations.
    digest = hashlib.blake2b(f"{seed}:validation".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    order = torch.randperm(n, generator=generator).numpy()
    return Rows(dataset, np.sort(order[k:])), Rows(dataset, np.sort(order[:k]))


def split_off_validation(cfg, dataset: SFTDataset, tokenizer):
    """(the training data set, the validation set or None) for the run's config."""
    d = cfg.data
    if d.valid_path is not None:
        return dataset, cached_sft_dataset(d.valid_path, tokenizer, d.seq_length,
                                           on_error=d.on_error, overlong=d.overlong,
                                           cache_dir=d.cache_dir)
    if d.valid_fraction is not None:
        return hold_out(dataset, d.valid_fraction, cfg.trainer.seed)
    return dataset, None


class Validation:
    """``due(step)``: whether to validate after ``step``; ``()``: the pass, its metrics as
    ``valid/<name>`` on every rank.

    ``forward_only(batches, loss_fn)``: the last stage's outputs of ``loss_fn`` over this
    rank's ``batches`` (the trainer's forward path); ``reduce_sums(outputs)``: their sums over
    micro-batches and data-parallel ranks, on every rank (the trainer's step reduction)."""

    def __init__(self, cfg, dataset, *, total_steps: int, dp_rank: int, dp_size: int,
                 forward_only: Callable[[Batches, Callable], List[dict]],
                 reduce_sums: Callable[[List[dict]], Dict[str, float]], device):
        self.dataset, self.total_steps = dataset, total_steps
        self.interval = cfg.trainer.eval_interval
        self.micro_batch_size = cfg.trainer.micro_batch_size
        self.forward_only, self.reduce_sums = forward_only, reduce_sums
        # The anchored method's diagnostics on every pass, whatever logging.diagnostics_every.
        self.loss = MethodLoss.for_config(OmegaConf.merge(cfg, {"logging": {
            "diagnostics_every": 1}}))
        self.dp_rank, self.dp_size = dp_rank, dp_size
        prepared = self.loss.prepare(lambda fn: forward_only(self._slice(0, 1), fn), dataset,
                                     device)
        rows = "packed rows" if cfg.data.packing else "examples"
        self.summary = f"validation: {len(dataset)} {rows} ({self._source(cfg)}), after " \
                       + (f"every {self.interval} steps and " if self.interval else "") \
                       + f"the last step{f'; {prepared}' if prepared else ''}"

    def _source(self, cfg) -> str:
        d = cfg.data
        if d.valid_path is not None:
            return f"data.valid_path={d.valid_path}"
        return f"held out of the {self.dataset.report.examples_kept} examples of " \
               f"data.train_path by data.valid_fraction={d.valid_fraction} and " \
               f"trainer.seed={cfg.trainer.seed}"

    def due(self, step: int) -> bool:
        return step == self.total_steps or bool(self.interval and step % self.interval == 0)

    def __call__(self) -> Dict[str, float]:
        start = time.perf_counter()
        totals = self.reduce_sums(self.forward_only(self._slice(self.dp_rank, self.dp_size),
                                                     self.loss))
        tokens = totals["tokens"] or math.nan
        metrics = {"loss": totals["loss"] / tokens, **self.loss.metrics(totals, tokens),
                   "tokens": int(totals["tokens"]), "time_s": time.perf_counter() - start}
        return {f"valid/{key}": value for key, value in metrics.items()}

    def _slice(self, dp_rank: int, dp_size: int) -> Batches:
        """Rank ``dp_rank``'s equal, contiguous share of the set in micro-batches. The set is
        padded to a whole number of micro-batches per rank with copies of its last example
        whose loss mask is 0, so they count for nothing."""
        n, mbs = len(self.dataset), self.micro_batch_size
        per_rank = -(-n // (mbs * dp_size)) * mbs
        positions = torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        batches = []
        for chunk in positions.split(mbs):
            batch = self.dataset.batch(chunk.clamp_max(n - 1))
            batch["loss_mask"] = batch["loss_mask"] * (chunk < n).unsqueeze(1)
            batches.append(batch)
        return batches
