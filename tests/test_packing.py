"""Sequence packing (data.packing): first-fit decreasing against a direct implementation,
packed rows against each example alone in a row, the block-diagonal mask through megatron's
own masked softmax against per-example attention in float64, rotary positions against the
example alone, the packed batch order across a restart and its resume setting; one 2-process
launch (slow) checks packed against padded rows through the trainer: sft and anchored at TP=2,
sft at PP=2.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_anchored.config import ConfigError, load_config
from nemo_anchored.data import BatchOrder, ByteTokenizer, DataError, load_sft_dataset
from nemo_anchored.data.cache import cached_sft_dataset
from nemo_anchored.data.packing import (block_causal_mask, first_fit_decreasing,
                                        restarting_positions)
from nemo_anchored.models.positions import rotary_at_positions
from tests.launch import assert_topic, worker_checks

TOK = ByteTokenizer()
SEQ = 32


def write_examples(tmp_path, responses, prompt="Q: ", name="data.jsonl"):
    """One prompt/response example per response; byte tokens, so lengths follow the text."""
    path = tmp_path / name
    path.write_text("".join(json.dumps({"prompt": f"{prompt}{i}\n", "response": response}) + "\n"
                            for i, response in enumerate(responses)))
    return path


def reference_first_fit_decreasing(lengths, capacity):
    """The textbook algorithm: longest first (ties by index), into the first open bin with
    room, scanning the open bins in the order they were opened."""
    bins, free = [], []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[item]:
                bins[b].append(item)
                free[b] -= lengths[item]
                break
        else:
            bins.append([item])
            free.append(capacity - lengths[item])
    return [sorted(b) for b in bins]


def test_first_fit_decreasing_matches_the_textbook_algorithm():
    rng = np.random.default_rng(0)
    for capacity, lengths in [(64, rng.integers(1, 65, 300)), (10, [10, 1, 9, 2, 8, 3, 5, 5]),
                              (7, [3] * 11), (5, [5]), (5, [])]:
        bins = first_fit_decreasing(lengths, capacity)
        assert [b.tolist() for b in bins] == reference_first_fit_decreasing(list(lengths),
                                                                            capacity)
        items = np.concatenate(bins) if bins else np.array([], dtype=np.int64)
        assert sorted(items.tolist()) == list(range(len(lengths)))  # each item exactly once
        assert all(np.asarray(lengths)[b].sum() <= capacity for b in bins)
        assert [b.tolist() for b in first_fit_decreasing(lengths, capacity)] == \
            [b.tolist() for b in bins]  # deterministic


def test_first_fit_decreasing_refuses_an_item_that_does_not_fit():
    with pytest.raises(ValueError, match=r"item 2 has length 65, outside \[1, capacity=64\]"):
        first_fit_decreasing([3, 64, 65], 64)
    with pytest.raises(ValueError, match="item 0 has length 0"):
        first_fit_decreasing([0], 64)


def test_packed_rows_hold_each_example_as_it_is_alone(tmp_path):
    responses = ["a" * n for n in (1, 20, 3, 7, 12, 2, 5, 9, 4, 15, 6)]
    dataset = load_sft_dataset(write_examples(tmp_path, responses), TOK, SEQ)
    packed = dataset.packed()
    assert len(packed) < len(dataset)
    batch = packed.batch(range(len(packed)))
    seen = []
    for row, examples in enumerate(packed.bins):
        at = 0
        for segment, example in enumerate(examples.tolist(), start=1):
            alone = dataset.batch([example])
            n = int(dataset.offsets[example + 1] - dataset.offsets[example]) - 1
            window = slice(at, at + n)
            for key in ("tokens", "labels", "loss_mask"):
                assert torch.equal(batch[key][row, window], alone[key][0, :n]), (row, key)
            assert torch.equal(batch["position_ids"][row, window], torch.arange(n))
            # Attends to its own earlier positions only.
            allowed = ~batch["attention_mask"][row, 0]
            expected = torch.zeros(SEQ, dtype=torch.bool)
            expected[at:at + 1] = True
            assert torch.equal(allowed[at], expected)
            assert allowed[at + n - 1].sum() == n and allowed[at + n - 1, window].all()
            seen.append(example)
            at += n
        assert at <= SEQ
        tail = slice(at, SEQ)  # padding: no loss, positions from 0, attends to padding only
        assert (batch["tokens"][row, tail] == TOK.pad_id).all()
        assert (batch["loss_mask"][row, tail] == 0).all()
        assert torch.equal(batch["position_ids"][row, tail], torch.arange(SEQ - at))
        assert not (~batch["attention_mask"][row, 0, tail, :at]).any()
    assert sorted(seen) == list(range(len(dataset)))
    assert batch["loss_mask"].sum() == dataset.loss_mask.sum()
    assert torch.equal(packed.loss_mask, batch["loss_mask"])
    assert torch.equal(batch["index"], torch.arange(len(packed)))
    padded, packed_fraction = packed.padding_fractions()
    used = (np.diff(dataset.offsets) - 1).sum()
    assert padded == pytest.approx(1 - used / (len(dataset) * SEQ))
    assert packed_fraction == pytest.approx(1 - used / (len(packed) * SEQ))


def test_overlong_examples_follow_data_overlong(tmp_path):
    path = write_examples(tmp_path, ["short", "x" * 60, "mid" * 4])  # line 2 needs > SEQ
    truncated = load_sft_dataset(path, TOK, SEQ, overlong="truncate")
    assert truncated.report.truncated == [2]
    packed = truncated.packed()
    row = next(b for b in packed.bins if 1 in b.tolist())
    assert row.tolist() == [1]  # cut to seq_length, as data.overlong says: a row of its own
    dropped = load_sft_dataset(path, TOK, SEQ, overlong="drop")
    assert dropped.report.dropped_overlong == [2]
    assert sorted(np.concatenate(dropped.packed().bins).tolist()) == [0, 1]
    with pytest.raises(DataError, match=":2: the example needs"):
        load_sft_dataset(path, TOK, SEQ, overlong="raise")


def test_the_mask_confines_megatrons_attention_to_each_example():
    # megatron's local attention softmax, given the mask under its causal mask type, against
    # causal attention computed for each example (and the padding tail) alone, in float64.
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2]])
    b, heads, s, d = 2, 3, segments.shape[1], 4
    g = torch.Generator().manual_seed(0)
    scores, values = torch.randn(b, heads, s, s, generator=g), torch.randn(b, heads, s, d,
                                                                             generator=g)
    softmax = FusedScaleMaskSoftmax(input_in_fp16=False, input_in_bf16=False,
                                    attn_mask_type=AttnMaskType.causal,
                                    scaled_masked_softmax_fusion=False,
                                    mask_func=attention_mask_func, softmax_in_fp32=True,
                                    scale=None)
    out = softmax(scores.clone(), block_causal_mask(segments)) @ values
    for row in range(b):
        for segment in segments[row].unique():
            where = torch.nonzero(segments[row] == segment).flatten()
            block = scores[row][:, where][:, :, where].double()
            causal = torch.ones(len(where), len(where), dtype=torch.bool).tril()
            probs = block.masked_fill(~causal, float("-inf")).softmax(-1)
            alone = probs @ values[row][:, where].double()
            assert (out[row][:, where].double() - alone).abs().max() < 1e-6


def test_rotary_positions_restart_exactly_as_each_example_alone():
    # A packed row rotated at its position ids: each example gets bitwise the rotation it gets
    # alone at positions 0..n-1 (by megatron's unfused rotary function), not that of its
    # offset in the row, whose float rounding differs.
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    s, d = 512, 16
    inverse = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inverse)
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # megatron's [s, 1, 1, d]
    segments = torch.tensor([[1] * 100 + [2] * 400 + [0] * 12, [1] * 512])
    positions = restarting_positions(segments)
    x = torch.randn(s, 2, 3, d, generator=torch.Generator().manual_seed(1))
    packed = _apply_rotary_pos_emb_bshd(x, rotary_at_positions(freqs, positions))
    for row, start, n in [(0, 0, 100), (0, 100, 400), (0, 500, 12), (1, 0, 512)]:
        alone = _apply_rotary_pos_emb_bshd(x[start:start + n, row:row + 1], freqs[:n])
        assert torch.equal(packed[start:start + n, row:row + 1], alone)
    at_offset = _apply_rotary_pos_emb_bshd(x[100:500, 0:1], freqs[100:500])
    assert not torch.equal(packed[100:500, 0:1], at_offset)


def test_a_packed_run_has_the_same_batches_after_a_restart_and_records_packing(tmp_path):
    from nemo_anchored.checkpoint.format import FORMAT_VERSION, MARKER
    from nemo_anchored.training.resume import data_identity, resume_point, settings_of

    path = write_examples(tmp_path, ["b" * n for n in range(1, 30, 2)])
    # The first start builds the token cache, the restart reads it; each packs after loading.
    first, restart = (cached_sft_dataset(path, TOK, SEQ, cache_dir=tmp_path / "cache")
                      for _ in range(2))
    assert "(read)" in restart.report.cache
    orders = [(data.packed(), BatchOrder(len(data.packed()), 4, 2, 0, 1, seed=3, packed=True))
              for data in (first, restart)]
    for epoch, step in [(0, 0), (1, 1)]:
        (a, order_a), (b, order_b) = orders
        for x, y in zip(order_a.micro_batches(a, epoch, step),
                        order_b.micro_batches(b, epoch, step), strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    saved = tmp_path / "step_0000004"  # a checkpoint saved by the same run without packing
    saved.mkdir()
    cfg = load_config("tiny_cpu", [f"checkpoint.resume={saved}"], check_paths=False)
    data = data_identity(first)
    assert data == data_identity(restart)  # the cache's arrays are the built ones
    (saved / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                            "state": {"settings": settings_of(cfg, data)}}))
    assert settings_of(cfg, data)["data.packing"] is False
    packing = load_config("tiny_cpu", [f"checkpoint.resume={saved}", "data.packing=true"])
    with pytest.raises(ConfigError, match="data.packing=False in the checkpoint, True now"):
        resume_point(packing, tmp_path, data)


def test_too_few_packed_rows_name_packing(tmp_path):
    with pytest.raises(DataError, match=r"packs into 3 rows \(data.packing=true\), fewer than "
                                        r"one global batch"):
        BatchOrder(3, 4, 2, 0, 1, seed=0, train_path="x.jsonl", packed=True)


@pytest.mark.slow
def test_packed_rows_train_as_padded_rows_tp2_pp2(tmp_path):
    # One launch (2 processes): sft (megatron's local attention) and anchored (the default
    # attention) at TP=2, sft at PP=2; equal summed losses, metric sums and gradients within
    # fp32 rounding (tests/packing_worker.py).
    checks = worker_checks(Path(__file__).with_name("packing_worker.py"), tmp_path,
                           "--work", tmp_path, nproc=2)
    assert_topic(checks, "sft", 2 * 20)
    assert_topic(checks, "anchored", 2 * 25)
    assert_topic(checks, "sft_pp2", 20)
