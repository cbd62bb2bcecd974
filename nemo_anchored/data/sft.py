"""Supervised fine-tuning data: JSONL conversations (chat messages or prompt/response pairs)
as padded tensors with a loss mask on the assistant's tokens, and the deterministic, resumable,
data-parallel order in which training visits them.

Nothing is dropped silently: every line read ends up kept, skipped (bad data, with its line
number and reason) or dropped for length, and ``DataReport.summary()`` says which.

By default each example is one row, padded to seq_length. Padding is correct for attention as
it is: attention is causal and the padding comes after the example, so no real token attends to
a pad, and pad positions are out of the loss (loss_mask 0), so what pads compute is never
trained on. With data.packing, ``packed()`` places the examples into seq_length rows by
first-fit decreasing (data/packing.py); a packed row's micro-batch carries the block-diagonal
causal ``attention_mask`` and position ids restarting at each example, so that each example
computes what it would alone in a row. Packing is a layout of the loaded examples, computed
after loading (the tokenized-data cache holds examples, whatever data.packing says).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nemo_anchored.data.packing import (block_causal_mask, first_fit_decreasing,
                                        restarting_positions)
from nemo_anchored.data.tokenizer import ConversationError, Tokenizer, TokenizerError
from nemo_anchored.errors import UserError

ON_ERROR = ("raise", "skip")
OVERLONG = ("truncate", "drop", "raise")

# How many line numbers / skip reasons summary() spells out before "and N more".
_SUMMARY_LIMIT = 10


class DataError(ValueError, UserError):
    """Unusable training data; per-line problems read "FILE:LINE: reason"."""


class _BadLine(Exception):
    """A line that is not a usable example; handled per data.on_error."""


class _BlankLine(_BadLine):
    """A line with no content: reported as skipped, but never an error (a trailing blank line
    is common and harmless)."""


@dataclass
class DataReport:
    """What became of every line of the file: lines_read equals examples_kept + len(skipped)
    + len(dropped_overlong) + len(dropped_no_response). Line numbers are 1-based."""

    path: str
    seq_length: int
    lines_read: int = 0
    examples_kept: int = 0
    skipped: List[Tuple[int, str]] = field(default_factory=list)  # (line, reason): bad data
    truncated: List[int] = field(default_factory=list)  # kept, cut to seq_length
    dropped_overlong: List[int] = field(default_factory=list)  # data.overlong=drop
    # No assistant token within seq_length to learn from (the prompt fills the window).
    dropped_no_response: List[int] = field(default_factory=list)
    # Where the tokens came from when cached: the cache directory, built or read (cache.py).
    cache: str = ""

    def summary(self) -> str:
        """A few lines for the trainer's log."""
        parts = [f"{self.path}: {self.lines_read} lines read, {self.examples_kept} examples "
                 f"kept (seq_length {self.seq_length})"]
        if self.truncated:
            # Examples end with their last assistant token, so a cut loses at least that
            # turn's end-of-turn token: these examples do not teach the model to stop there.
            parts.append(f"{len(self.truncated)} truncated to seq_length, losing at least the "
                         f"end of their last assistant turn ({_line_list(self.truncated)})")
        if self.dropped_overlong:
            parts.append(f"{len(self.dropped_overlong)} dropped as longer than seq_length "
                         f"({_line_list(self.dropped_overlong)})")
        if self.dropped_no_response:
            parts.append(f"{len(self.dropped_no_response)} dropped: no response token within "
                         f"seq_length ({_line_list(self.dropped_no_response)})")
        if self.skipped:
            reasons = [f"line {line}: {reason}" for line, reason in
                       self.skipped[:_SUMMARY_LIMIT]]
            if len(self.skipped) > _SUMMARY_LIMIT:
                reasons.append(f"and {len(self.skipped) - _SUMMARY_LIMIT} more")
            parts.append(f"{len(self.skipped)} lines skipped ({'; '.join(reasons)})")
        if self.cache:
            parts.append(f"tokens cached in {self.cache}")
        return "\n  ".join(parts)


def _line_list(lines: List[int]) -> str:
    shown = ", ".join(map(str, lines[:_SUMMARY_LIMIT]))
    more = len(lines) - _SUMMARY_LIMIT
    return ("line " if len(lines) == 1 else "lines ") + shown + (
        f" and {more} more" if more > 0 else "")


@dataclass
class SFTDataset:
    """Examples stored end to end, padded into ``[b, seq_length]`` rows when a batch is asked
    for, so that a large data set costs its token count, not N x seq_length, in memory (and,
    read from the tokenized-data cache, is shared between the ranks of a node through the page
    cache: see cache.py).

    Example i is ``ids[offsets[i]:offsets[i + 1]]``, its tokens through its last assistant
    token (at most seq_length + 1 of them), with ``assistant`` 1 on the assistant (response)
    tokens and the end-of-turn token closing each assistant turn. In a batch, ``tokens`` are
    the model inputs and ``labels`` the next tokens (the example shifted by one); ``loss_mask``
    is 1.0 where the label is an assistant token and 0.0 on prompt, template and padding
    positions. Padding is pad_id in both tokens and labels.
    """

    ids: np.ndarray  # int32 [total tokens]
    assistant: np.ndarray  # uint8 [total tokens]
    offsets: np.ndarray  # int64 [N + 1], from 0 to total tokens
    seq_length: int
    pad_id: int
    report: DataReport

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, index: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The examples ``index`` as a batch: ``tokens``, ``position_ids``, ``labels`` (int64
        ``[b, s]``), ``loss_mask`` (float32 ``[b, s]``) and ``index`` (int64 ``[b]``, the
        example numbers, for per-example data such as a baseline's token masks)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        rows = index.numpy()
        starts = self.offsets[rows]
        positions = np.arange(self.seq_length)
        # Row r's position j holds example token starts[r] + j, its label the token after.
        valid = positions < (self.offsets[rows + 1] - starts - 1)[:, None]
        at = np.minimum(starts[:, None] + positions, len(self.ids) - 2)
        tokens = np.where(valid, self.ids[at], self.pad_id)
        labels = np.where(valid, self.ids[at + 1], self.pad_id)
        loss_mask = np.where(valid, self.assistant[at + 1], 0)
        return {
            "tokens": torch.from_numpy(tokens.astype(np.int64)),
            "position_ids": torch.arange(self.seq_length).repeat(len(index), 1),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
            "index": index,
        }

    # The whole data set as [N, seq_length] rows, built on each access (N x seq_length x 20
    # bytes): for small data sets and whole-data passes, not for the training loop.
    @property
    def tokens(self) -> torch.Tensor:
        return self.batch(range(len(self)))["tokens"]

    @property
    def labels(self) -> torch.Tensor:
        return self.batch(range(len(self)))["labels"]

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.batch(range(len(self)))["loss_mask"]

    def packed(self) -> PackedSFTDataset:
        """Every example, packed into seq_length rows (data.packing)."""
        return pack_examples(self, np.arange(len(self)))


@dataclass
class PackedSFTDataset:
    """Examples of an SFTDataset packed into ``[b, seq_length]`` rows: row r holds the examples
    ``bins[r]`` end to end, then padding. A batch of rows has ``SFTDataset.batch``'s keys, each
    example's tokens, labels and loss mask as they would be alone in a row, plus
    ``attention_mask`` (bool ``[b, 1, s, s]``, True: not attended; each example attends
    causally to itself only) and ``position_ids`` restarting at 0 at each example
    (data/packing.py). ``index`` numbers the rows. The loss mask is per token, so a loss summed
    over the response tokens and divided by their count is the same whatever the packing.
    """

    examples: SFTDataset
    bins: List[np.ndarray]  # int64 example numbers of each row, in row order

    def __len__(self) -> int:
        return len(self.bins)

    @property
    def seq_length(self) -> int:
        return self.examples.seq_length

    @property
    def report(self) -> DataReport:
        return self.examples.report

    def batch(self, index: Sequence[int]) -> Dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.int64)
        tokens, labels, loss_mask, segments = self._rows(index.tolist())
        segments = torch.from_numpy(segments)
        return {
            "tokens": torch.from_numpy(tokens),
            "position_ids": restarting_positions(segments),
            "attention_mask": block_causal_mask(segments),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "index": index,
        }

    @property
    def loss_mask(self) -> torch.Tensor:
        # Not through batch(): every row's [s, s] mask would take N x s^2 bytes.
        return torch.from_numpy(self._rows(range(len(self)))[2])

    def _rows(self, index: Sequence[int]) -> Tuple[np.ndarray, ...]:
        """(tokens, labels, loss_mask, segment ids) ``[b, s]`` of the rows ``index``; segment
        ids number a row's examples from 1 and are 0 on its padding tail."""
        data, s = self.examples, self.seq_length
        tokens = np.full((len(index), s), data.pad_id, dtype=np.int64)
        labels = tokens.copy()
        loss_mask = np.zeros((len(index), s), dtype=np.float32)
        segments = np.zeros((len(index), s), dtype=np.int64)
        for row, examples in enumerate(self.bins[i] for i in index):
            starts = data.offsets[examples]
            lengths = data.offsets[examples + 1] - starts - 1  # an example's positions
            used = int(lengths.sum())
            # Position j of the row holds token at[j] of the examples stored end to end.
            at = np.arange(used) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
            tokens[row, :used] = data.ids[at]
            labels[row, :used] = data.ids[at + 1]
            loss_mask[row, :used] = data.assistant[at + 1]
            segments[row, :used] = np.repeat(np.arange(1, len(examples) + 1), lengths)
        return tokens, labels, loss_mask, segments

    def padding_fractions(self) -> Tuple[float, float]:
        """(padding fraction of the positions one example per row, the same packed)."""
        positions = np.diff(self.examples.offsets) - 1  # each example's positions
        used = sum(int(positions[b].sum()) for b in self.bins)
        examples = sum(len(b) for b in self.bins)
        return 1 - used / (examples * self.seq_length), 1 - used / (len(self) * self.seq_length)

    def summary(self) -> str:
        """A line for the log: how much padding packing removed."""
        padded, packed = self.padding_fractions()
        return (f"data.packing: {sum(len(b) for b in self.bins)} examples packed into "
                f"{len(self)} rows of {self.seq_length} positions; padding: {padded:.1%} of "
                f"the positions one example per row, {packed:.1%} packed")


def pack_examples(dataset: SFTDataset, examples: np.ndarray) -> PackedSFTDataset:
    """The ``examples`` (example numbers of ``dataset``) packed into seq_length rows by
    first-fit decreasing on their lengths (deterministic: the same examples, the same rows).
    Every example fits: load_sft_dataset has already truncated, dropped or refused those
    longer than seq_length, as data.overlong says."""
    examples = np.asarray(examples, dtype=np.int64)
    lengths = dataset.offsets[examples + 1] - dataset.offsets[examples] - 1
    return PackedSFTDataset(dataset, [examples[b] for b in
                                      first_fit_decreasing(lengths, dataset.seq_length)])


def load_sft_dataset(path: Union[str, Path], tokenizer: Tokenizer, seq_length: int,
                     on_error: str = "raise", overlong: str = "truncate") -> SFTDataset:
    """Read a JSONL file into an SFTDataset. Each line is one of

    - ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``:
      rendered by ``tokenizer.encode_conversation`` (the chat template; the byte tokenizer's
      plain rendering); at least one assistant turn, none with empty content;
    - ``{"prompt": str, "response": str}`` (non-empty response): with a chat template, the
      exchange user: prompt, assistant: response; without one, ``[bos?] + encode(prompt) +
      encode(response) + [eos]``.

    Both may be mixed in one file; other top-level keys are ignored. The loss covers the
    assistant (response) tokens and the end-of-turn token closing each assistant turn. Tokens
    after the last assistant turn (a template's trailing newline, a final user message) are
    left out: they train nothing and cannot affect what is trained, attention being causal.
    An example of L tokens needs L - 1 training positions.

    Bad lines (malformed JSON, not an object, invalid fields or messages, a conversation the
    chat template rejects or mis-renders, invalid UTF-8) raise DataError "FILE:LINE: reason"
    with on_error="raise", or are skipped and reported with "skip". Blank lines carry no
    example, so they are skipped and reported under either setting. A tokenizer that cannot
    render the data at all (chat messages without a chat template) raises DataError under
    either setting. Examples over seq_length positions are truncated to the first seq_length
    positions, dropped, or raise DataError, per ``overlong``; one left with no assistant token
    in the window (the prompt fills it) cannot train anything and is dropped and reported.
    Raises DataError when no example is left.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}")
    if overlong not in OVERLONG:
        raise ValueError(f"data.overlong: {overlong!r} is not one of {', '.join(OVERLONG)}")
    if seq_length < 1:
        raise ValueError(f"data.seq_length: {seq_length} must be >= 1")

    report = DataReport(path=str(path), seq_length=seq_length)
    # (int32 token ids, uint8 assistant mask) within the window: compact, since as Python ints
    # the tokens of a large file would take about ten times the memory.
    examples: List[Tuple[np.ndarray, np.ndarray]] = []
    # Binary mode splits on b"\n" only; text mode would also split inside a JSON string at
    # characters such as U+2028, shifting every later line number.
    with open(path, "rb") as stream:
        for line, raw in enumerate(stream, start=1):
            report.lines_read = line
            try:
                ids, mask = _encode_line(raw, line == 1, tokenizer)
            except _BadLine as bad:
                if on_error == "raise" and not isinstance(bad, _BlankLine):
                    raise DataError(f"{path}:{line}: {bad}") from None
                report.skipped.append((line, str(bad)))
                continue
            except TokenizerError as error:
                raise DataError(f"{path}:{line}: {error}") from None
            end = max((j + 1 for j, assistant in enumerate(mask) if assistant), default=0)
            ids, mask = ids[:end], mask[:end]
            if len(ids) - 1 > seq_length:
                if overlong == "raise":
                    raise DataError(
                        f"{path}:{line}: the example needs {len(ids) - 1} positions "
                        f"({len(ids)} tokens through its last assistant turn), over "
                        f"data.seq_length={seq_length} (data.overlong=raise)")
                if overlong == "drop":
                    report.dropped_overlong.append(line)
                    continue
                ids, mask = ids[:seq_length + 1], mask[:seq_length + 1]
                truncated = True
            else:
                truncated = False
            # Label j is ids[j + 1], so mask[1:] says which labels are trained.
            if not any(mask[1:]):
                report.dropped_no_response.append(line)
                continue
            if truncated:
                report.truncated.append(line)
            examples.append((np.array(ids, np.int32), np.array(mask, np.uint8)))

    report.examples_kept = len(examples)
    if not examples:
        raise DataError(f"{report.summary()}\n  no training examples left")

    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids, _ in examples], out=offsets[1:])
    return SFTDataset(ids=np.concatenate([ids for ids, _ in examples]),
                      assistant=np.concatenate([mask for _, mask in examples]),
                      offsets=offsets, seq_length=seq_length, pad_id=tokenizer.pad_id,
                      report=report)


def _encode_line(raw: bytes, first: bool, tokenizer: Tokenizer) -> Tuple[List[int], List[int]]:
    """(ids, assistant mask) of one JSONL line, or _BadLine with the reason."""
    record = _parse_record(raw, first)
    try:
        if "messages" in record:
            if "prompt" in record or "response" in record:
                raise _BadLine("has both 'messages' and 'prompt'/'response' (one format per "
                               "line)")
            return tokenizer.encode_conversation(record["messages"])
        return tokenizer.encode_example(*_prompt_and_response(record))
    except ConversationError as error:
        raise _BadLine(str(error)) from None


def _parse_record(raw: bytes, first: bool) -> dict:
    """The JSON object on one line, or _BadLine with the reason."""
    try:
        # A UTF-8 byte-order mark, which some editors write, may start the file.
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        raise _BadLine(f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise _BlankLine("blank line")
    try:
        record = json.loads(text, object_pairs_hook=_object_without_duplicate_keys)
    except json.JSONDecodeError as error:
        raise _BadLine(f"malformed JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise _BadLine("malformed JSON (nested too deeply to parse)") from None
    if not isinstance(record, dict):
        raise _BadLine(f"not a JSON object (got {type(record).__name__})")
    return record


def _object_without_duplicate_keys(pairs: List[Tuple[str, Any]]) -> dict:
    """A JSON object's dict; a key given twice is _BadLine (json.loads would keep the last value
    and drop the other without a word)."""
    record = {}
    for key, value in pairs:
        if key in record:
            raise _BadLine(f"malformed JSON (key {key!r} given twice in one object)")
        record[key] = value
    return record


def _prompt_and_response(record: dict) -> Tuple[str, str]:
    """(prompt, response) of a prompt/response record, or _BadLine with the reason."""
    if "prompt" not in record and "response" not in record:
        raise _BadLine("needs 'messages', or 'prompt' and 'response'")
    fields = []
    for key in ("prompt", "response"):
        if key not in record:
            raise _BadLine(f"missing {key!r}")
        value = record[key]
        if not isinstance(value, str):
            raise _BadLine(f"{key!r} is not a string (got {type(value).__name__})")
        try:
            # JSON escapes can spell lone surrogates, which have no UTF-8 bytes.
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadLine(f"{key!r} contains a lone surrogate (invalid Unicode)") from None
        fields.append(value)
    prompt, response = fields
    if not response:
        raise _BadLine("'response' is empty")
    return prompt, response


class BatchOrder:
    """Which rows each data-parallel rank trains on at each step: pure index arithmetic
    on (seed, epoch, step), so every rank agrees without communicating and a run resumes
    exactly from a saved (epoch, step).

    A row is an example, or with data.packing (``packed=True``) a packed row of examples, whose
    packing is itself deterministic. Each epoch is a permutation of the rows (identity when
    ``shuffle`` is False) cut into ``steps_per_epoch`` global batches of ``global_batch_size``
    rows; the last ``unused_per_epoch`` rows of the permutation are not visited that epoch
    (with shuffling, a different subset each epoch). Rank r takes the r-th contiguous slice of
    a global batch, split into micro-batches in order, so concatenating the ranks'
    micro-batches gives the global batch back.

    A data set smaller than one global batch is the user's to fix: DataError naming
    ``train_path`` (data.train_path, when given) and trainer.global_batch_size.
    """

    def __init__(self, num_examples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True, *,
                 train_path: Optional[str] = None, packed: bool = False):
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} and dp_size={dp_size} must "
                             f"be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        per_step = micro_batch_size * dp_size
        if global_batch_size < per_step or global_batch_size % per_step:
            raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of "
                             f"micro_batch_size x data-parallel size = {micro_batch_size} x "
                             f"{dp_size}")
        if num_examples < global_batch_size:
            data = f"data.train_path={train_path}" if train_path else "the data set"
            rows = f"packs into {num_examples} rows (data.packing=true)" if packed else \
                f"has {num_examples} examples"
            raise DataError(f"{data} {rows}, fewer than one global batch "
                            f"(trainer.global_batch_size={global_batch_size})")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_examples // global_batch_size
        self.unused_per_epoch = num_examples % global_batch_size
        self.num_micro_batches = global_batch_size // per_step  # per rank and step
        self._cached: Optional[Tuple[int, torch.Tensor]] = None  # the last epoch's order

    def epoch_and_step(self, global_step: int) -> Tuple[int, int]:
        """(epoch, step within the epoch) of the ``global_step``-th optimizer step (0-based)."""
        if global_step < 0:
            raise ValueError(f"global step {global_step} must be >= 0")
        return divmod(global_step, self.steps_per_epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of all examples in ``epoch``, identical on every rank."""
        return self._permutation(epoch).clone()

    def indices(self, epoch: int, step: int) -> List[torch.Tensor]:
        """This rank's micro-batches of example indices (int64) for ``step`` of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} is outside [0, steps_per_epoch="
                             f"{self.steps_per_epoch})")
        per_rank = self.global_batch_size // self.dp_size
        start = step * self.global_batch_size + self.dp_rank * per_rank
        mine = self._permutation(epoch)[start:start + per_rank]
        return [chunk.clone() for chunk in mine.split(self.micro_batch_size)]

    def micro_batches(self, dataset: SFTDataset, epoch: int,
                      step: int) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches for ``step`` of ``epoch`` (see ``SFTDataset.batch``)."""
        if len(dataset) != self.num_examples:
            raise ValueError(f"the data set has {len(dataset)} examples; this BatchOrder was "
                             f"built for {self.num_examples}")
        return [dataset.batch(index) for index in self.indices(epoch, step)]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                order = torch.randperm(self.num_examples, generator=generator)
            else:
                order = torch.arange(self.num_examples)
            self._cached = (epoch, order)
        return self._cached[1]


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit generator seed from (seed, epoch). Hashing, not seed + epoch, so that runs with
    neighbouring seeds do not replay each other's epochs one epoch apart."""
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
