"""The SFT data pipeline: byte tokenizer, JSONL loading (masks, padding, length policies, bad
data) and the data-parallel batch order. Expectations are built here from the raw bytes, not
from the code under test."""
import json
from pathlib import Path

import pytest
import torch

from nemo_anchored.data import (BatchOrder, ByteTokenizer, DataError, build_tokenizer,
                                load_sft_dataset)

REPO = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
PAD, BOS, EOS = 256, 257, 258


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    """A JSONL file from dicts (serialised) and strings (written verbatim)."""
    path = tmp_path / name
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def example(prompt, response):
    return {"prompt": prompt, "response": response}


def assert_every_line_accounted_for(report):
    assert report.lines_read == (report.examples_kept + len(report.skipped)
                                 + len(report.dropped_overlong)
                                 + len(report.dropped_no_response))


# --- tokenizer --------------------------------------------------------------------------------

def test_byte_tokenizer_ids_and_round_trip():
    assert (TOK.vocab_size, TOK.pad_id, TOK.bos_id, TOK.eos_id) == (259, PAD, BOS, EOS)
    for text in ["", "Reverse: sable\n", "naïve café — 東京 🚀", "\x00\x7f"]:
        ids = TOK.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert TOK.decode(ids) == text


def test_byte_tokenizer_decode_skips_specials_and_replaces_invalid_utf8():
    assert TOK.decode([BOS, *TOK.encode("hé"), EOS, PAD, PAD]) == "hé"
    assert TOK.decode([0xC3]) == "\ufffd"  # a lone UTF-8 lead byte
    with pytest.raises(ValueError, match="259"):
        TOK.decode([259])


def test_build_tokenizer():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="data.tokenizer.*'gpt2'"):
        build_tokenizer("gpt2")


# --- examples, masks and padding --------------------------------------------------------------

def test_mask_selects_exactly_response_and_eos(tmp_path):
    prompt, response = "Add: 2+2\n", "4é"
    path = write_jsonl(tmp_path, [example(prompt, response), example("", "x")])
    data = load_sft_dataset(path, TOK, seq_length=20)
    full = [BOS, *prompt.encode(), *response.encode("utf-8"), EOS]
    n = len(full) - 1
    assert data.tokens[0, :n].tolist() == full[:-1]
    assert data.labels[0, :n].tolist() == full[1:]
    mask = data.loss_mask[0].bool()
    assert data.labels[0][mask].tolist() == [*response.encode("utf-8"), EOS]
    assert TOK.decode(data.labels[0][mask].tolist()) == response
    # The mask starts where the input is the last prompt byte (it predicts the first response
    # byte) and covers one position per response byte plus the eos.
    first = mask.nonzero()[0].item()
    assert data.tokens[0, first].item() == prompt.encode()[-1]
    assert int(mask.sum()) == len(response.encode("utf-8")) + 1
    # An empty prompt is allowed: bos predicts the first response token.
    assert data.tokens[1, :2].tolist() == [BOS, ord("x")]
    assert data.loss_mask[1, :3].tolist() == [1.0, 1.0, 0.0]


def test_padding_and_tensor_layout(tmp_path):
    path = write_jsonl(tmp_path, [example("ab", "cd")])
    data = load_sft_dataset(path, TOK, seq_length=10)
    assert len(data) == 1 and data.seq_length == 10
    assert data.tokens.dtype == data.labels.dtype == torch.int64
    assert data.loss_mask.dtype == torch.float32
    # [bos a b c d eos]: 5 positions, then padding.
    assert data.tokens[0].tolist() == [BOS, 97, 98, 99, 100] + [PAD] * 5
    assert data.labels[0].tolist() == [97, 98, 99, 100, EOS] + [PAD] * 5
    assert data.loss_mask[0].tolist() == [0, 0, 1, 1, 1] + [0] * 5


def test_recipe_data_set_loads_cleanly():
    data = load_sft_dataset(REPO / "recipes/data/tiny_sft.jsonl", TOK, seq_length=48)
    report = data.report
    assert report.lines_read == report.examples_kept == len(data) == 96
    assert not (report.skipped or report.truncated or report.dropped_overlong
                or report.dropped_no_response)
    assert (data.loss_mask.sum(dim=1) >= 2).all()  # every example trains a response and eos


# --- length policies --------------------------------------------------------------------------

def length_cases(tmp_path):
    """Line 1 fits exactly (5 positions), line 2 is overlong with room for some of its
    response, line 3's prompt alone fills the window."""
    return write_jsonl(tmp_path, [example("ab", "cd"), example("abc", "defghij"),
                                  example("abcdefgh", "xy")])


def test_exact_fit_is_not_truncated(tmp_path):
    data = load_sft_dataset(write_jsonl(tmp_path, [example("ab", "cd")]), TOK, seq_length=5)
    assert data.labels[0].tolist() == [97, 98, 99, 100, EOS]
    assert data.report.truncated == []


def test_truncate_keeps_the_first_positions(tmp_path):
    data = load_sft_dataset(length_cases(tmp_path), TOK, seq_length=5, overlong="truncate")
    report = data.report
    assert (report.lines_read, report.examples_kept) == (3, 2)
    assert report.truncated == [2]
    assert report.dropped_no_response == [3]
    full = [BOS, *b"abcdefghij", EOS]
    assert data.tokens[1].tolist() == full[:5]
    assert data.labels[1].tolist() == full[1:6]  # the eos is cut off
    assert data.loss_mask[1].tolist() == [0, 0, 0, 1, 1]  # labels d, e
    assert "1 truncated" in report.summary() and "(line 3)" in report.summary()
    assert_every_line_accounted_for(report)


def test_drop_overlong(tmp_path):
    data = load_sft_dataset(length_cases(tmp_path), TOK, seq_length=5, overlong="drop")
    assert len(data) == 1
    assert data.report.dropped_overlong == [2, 3]
    assert data.report.truncated == data.report.dropped_no_response == []
    assert "2 dropped as longer than seq_length" in data.report.summary()
    assert_every_line_accounted_for(data.report)


def test_raise_on_overlong(tmp_path):
    path = length_cases(tmp_path)
    with pytest.raises(DataError, match=rf"^{path}:2: .*11 positions.*seq_length=5"):
        load_sft_dataset(path, TOK, seq_length=5, overlong="raise")


def test_invalid_policies():
    with pytest.raises(ValueError, match="data.on_error"):
        load_sft_dataset("unused.jsonl", TOK, 8, on_error="ignore")
    with pytest.raises(ValueError, match="data.overlong"):
        load_sft_dataset("unused.jsonl", TOK, 8, overlong="wrap")


# --- bad data ---------------------------------------------------------------------------------

BAD_LINES = {
    "malformed JSON": '{"prompt": "a", "response": ',
    "not a JSON object": '["a", "b"]',
    "missing 'prompt'": '{"response": "b"}',
    "missing 'response'": '{"prompt": "a"}',
    "'prompt' is not a string": '{"prompt": 3, "response": "b"}',
    "'response' is not a string": '{"prompt": "a", "response": null}',
    "'response' is empty": '{"prompt": "a", "response": ""}',
    "lone surrogate": '{"prompt": "\\ud800", "response": "b"}',
}


@pytest.mark.parametrize("reason", BAD_LINES)
def test_bad_line_raises_with_file_and_line(tmp_path, reason):
    path = write_jsonl(tmp_path, [example("a", "b"), BAD_LINES[reason], example("c", "d")])
    with pytest.raises(DataError, match=rf"^{path}:2: .*{reason}"):
        load_sft_dataset(path, TOK, seq_length=8)


def test_bad_lines_are_skipped_and_counted(tmp_path):
    lines = [example("a", "b")] + list(BAD_LINES.values()) + [example("c", "d")]
    data = load_sft_dataset(write_jsonl(tmp_path, lines), TOK, seq_length=8, on_error="skip")
    report = data.report
    assert len(data) == report.examples_kept == 2
    assert report.lines_read == len(lines)
    assert [line for line, _ in report.skipped] == list(range(2, 2 + len(BAD_LINES)))
    for (_, got), expected in zip(report.skipped, BAD_LINES):
        assert expected in got
    assert f"{len(BAD_LINES)} lines skipped" in report.summary()
    assert_every_line_accounted_for(report)
    assert data.tokens[1, :3].tolist() == [BOS, ord("c"), ord("d")]


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        load_sft_dataset(path, TOK, seq_length=8)
    data = load_sft_dataset(path, TOK, seq_length=8, on_error="skip")
    assert len(data) == 1 and data.report.skipped[0][0] == 2


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    assert len(load_sft_dataset(path, TOK, seq_length=8)) == 1


def test_line_numbers_ignore_unicode_line_separators(tmp_path):
    # U+2028 inside a JSON string is not a line break in JSONL.
    path = write_jsonl(tmp_path, [example("a\u2028b", "c"), "{bad"])
    with pytest.raises(DataError, match=rf"^{path}:2: "):
        load_sft_dataset(path, TOK, seq_length=8)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_blank_lines_are_counted_as_skipped(tmp_path, on_error):
    path = write_jsonl(tmp_path, [example("a", "b"), "", "   ", example("c", "d")])
    report = load_sft_dataset(path, TOK, seq_length=8, on_error=on_error).report
    assert report.lines_read == 4 and report.examples_kept == 2
    assert report.skipped == [(2, "blank line"), (3, "blank line")]
    assert_every_line_accounted_for(report)


def test_no_examples_left_raises(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no training examples left"):
        load_sft_dataset(empty, TOK, seq_length=8)
    all_bad = write_jsonl(tmp_path, ["[]", "{}"], name="bad.jsonl")
    with pytest.raises(DataError, match=rf"(?s)^{all_bad}: 2 lines read.*2 lines skipped.*"
                                        r"no training examples left"):
        load_sft_dataset(all_bad, TOK, seq_length=8, on_error="skip")


# --- batch order ------------------------------------------------------------------------------

def orders(n=23, gbs=8, mbs=2, dp=2, seed=7, shuffle=True):
    return [BatchOrder(n, gbs, mbs, rank, dp, seed, shuffle) for rank in range(dp)]


def rank_indices(order, epoch, step):
    return torch.cat(order.indices(epoch, step)).tolist()


def test_epoch_layout():
    order = orders()[0]
    assert (order.steps_per_epoch, order.unused_per_epoch, order.num_micro_batches) == (2, 7, 2)
    assert order.epoch_and_step(0) == (0, 0)
    assert order.epoch_and_step(5) == (2, 1)


def test_ranks_agree_and_partition_each_global_batch():
    ranks = orders()
    for epoch in range(3):
        perm = ranks[0].permutation(epoch)
        assert all(torch.equal(r.permutation(epoch), perm) for r in ranks)
        assert sorted(perm.tolist()) == list(range(23))
        seen = []
        for step in range(ranks[0].steps_per_epoch):
            per_rank = [rank_indices(r, epoch, step) for r in ranks]
            assert all(len(part) == 4 for part in per_rank)
            together = [i for part in per_rank for i in part]
            # The ranks' contiguous slices, in rank order, are exactly the global batch.
            assert together == perm[step * 8:(step + 1) * 8].tolist()
            seen += together
        assert len(seen) == len(set(seen)) == 16  # no example twice in an epoch


def test_dp2_split_concatenates_to_the_dp1_global_batch():
    single = orders(dp=1, mbs=2)[0]
    pair = orders(dp=2, mbs=2)
    for epoch, step in [(0, 0), (0, 1), (4, 1)]:
        assert sum((rank_indices(r, epoch, step) for r in pair), []) == \
            rank_indices(single, epoch, step)


def test_shuffle_changes_order_and_left_out_examples_between_epochs():
    order = orders()[0]
    perms = [order.permutation(epoch).tolist() for epoch in range(5)]
    assert len({tuple(p) for p in perms}) == 5
    left_out = {frozenset(p[16:]) for p in perms}
    assert len(left_out) > 1
    other_seed = BatchOrder(23, 8, 2, 0, 2, seed=8, shuffle=True)
    assert other_seed.permutation(0).tolist() != perms[0]


def test_order_is_resumable():
    first, resumed = orders()[0], orders()[0]
    assert rank_indices(first, 3, 1) == rank_indices(first, 3, 1)
    rank_indices(first, 0, 0)  # a different epoch in between
    assert rank_indices(resumed, 3, 1) == rank_indices(first, 3, 1)


def test_no_shuffle_is_file_order():
    ranks = orders(shuffle=False)
    for epoch in range(2):
        assert ranks[0].permutation(epoch).tolist() == list(range(23))
        assert rank_indices(ranks[0], epoch, 1) == [8, 9, 10, 11]
        assert rank_indices(ranks[1], epoch, 1) == [12, 13, 14, 15]


def test_micro_batches_match_the_data_set(tmp_path):
    lines = [example(f"p{i}", f"r{i}" * (i + 1)) for i in range(10)]
    data = load_sft_dataset(write_jsonl(tmp_path, lines), TOK, seq_length=16)
    order = BatchOrder(len(data), 4, 2, dp_rank=1, dp_size=2, seed=0, shuffle=True)
    batches = order.micro_batches(data, epoch=1, step=1)
    assert len(batches) == 1
    batch = batches[0]
    assert batch["index"].tolist() == order.permutation(1)[6:8].tolist()
    assert batch["index"].dtype == torch.int64
    for key in ("tokens", "labels", "loss_mask"):
        assert batch[key].shape == (2, 16)
        assert torch.equal(batch[key], getattr(data, key)[batch["index"]])
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["position_ids"].tolist() == [list(range(16))] * 2
    assert torch.equal(data.batch([3])["tokens"][0], data.tokens[3])


def test_batch_order_validation(tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size=6 .* 2 x 2"):
        BatchOrder(100, 6, 2, 0, 2, 0, True)
    with pytest.raises(ValueError, match=r"3 examples, fewer than one global batch.*=4"):
        BatchOrder(3, 4, 2, 0, 1, 0, True)
    with pytest.raises(ValueError, match="dp_rank=2"):
        BatchOrder(8, 4, 2, 2, 2, 0, True)
    order = BatchOrder(8, 4, 2, 0, 1, 0, True)
    with pytest.raises(ValueError, match="steps_per_epoch=2"):
        order.indices(0, 2)
    with pytest.raises(ValueError, match="epoch -1"):
        order.indices(-1, 0)
    data = load_sft_dataset(write_jsonl(tmp_path, [example("a", "b")] * 3), TOK, 4)
    with pytest.raises(ValueError, match="3 examples.*built for 8"):
        order.micro_batches(data, 0, 0)
