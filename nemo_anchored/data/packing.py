"""Sequence packing: examples placed into ``seq_length`` rows by first-fit decreasing, and
what a packed row needs to behave as its examples would one per row: segment ids, position
ids restarting at each example, and the block-diagonal causal attention mask.

A packed row holds whole examples end to end, then padding. Its ``segment_ids`` number the
examples 1, 2, ... in row order and are 0 on the padding tail. The padding tail is treated as
one more segment: it attends causally to itself only, so no real token ever attends to a pad
or across an example boundary, and every row of the mask has an attended entry (a fully
masked row is a uniform softmax in megatron's masked fill and NaN in an ``-inf`` one); what
pads compute is never in the loss (loss mask 0).

The mask follows megatron's convention: bool ``[b, 1, s, s]``, True where the query position
(row) must NOT attend to the key position (column), causality included. megatron-core's local
``DotProductAttention`` uses a given mask as it is and builds its own causal mask only when
the mask is None (``FusedScaleMaskSoftmax.forward_torch_softmax``); its fused CUDA softmax,
off by default (``masked_softmax_fusion``), would ignore the mask under a causal mask type.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch


def first_fit_decreasing(lengths, capacity: int) -> List[np.ndarray]:
    """Bins of the items of ``lengths`` (each in ``[1, capacity]``), each bin's lengths summing
    to at most ``capacity``: items taken longest first (ties in index order), each into the
    first bin it fits in. Returns the bins in the order they were opened, each an int64 array
    of item indices in ascending order. Deterministic: the same lengths give the same bins.

    Raises ValueError naming the first item outside ``[1, capacity]``: an item never fits by
    being cut.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {lengths.shape}")
    bad = np.flatnonzero((lengths < 1) | (lengths > capacity))
    if bad.size:
        raise ValueError(f"item {bad[0]} has length {lengths[bad[0]]}, outside [1, "
                         f"capacity={capacity}]")
    n = len(lengths)
    if n == 0:
        return []
    # A max-tree over n bins' free space, all empty to begin with: the leftmost bin with room
    # is the first fit, and the empty bins to the right of the opened ones open in order.
    # O(n log n), where scanning the open bins would be O(n x bins).
    leaves = 1 << (n - 1).bit_length()
    free = [capacity] * (2 * leaves)
    bin_of = np.empty(n, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    for item, need in zip(order.tolist(), lengths[order].tolist()):
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        bin_of[item] = node - leaves
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    by_bin = np.lexsort((np.arange(n), bin_of))
    return np.split(by_bin, np.flatnonzero(np.diff(bin_of[by_bin])) + 1)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[b, s]``: True where a segment begins (position 0, and wherever the segment id
    changes)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def restarting_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """int64 ``[b, s]``: each position's offset from the start of its segment, so every
    example (and the padding tail) counts its positions from 0."""
    index = torch.arange(segment_ids.shape[-1]).expand_as(segment_ids)
    start = torch.where(segment_starts(segment_ids), index, 0).cummax(dim=-1).values
    return index - start


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[b, 1, s, s]`` in megatron's convention (True: not attended): position i attends
    to position j when both are in the same segment and j <= i."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal).unsqueeze(1)
