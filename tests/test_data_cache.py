"""The tokenized-data cache: a warm start gives exactly what tokenizing afresh gives (arrays and
report), a damaged cache is rebuilt, a changed input is a new cache, and under
torch.distributed one rank builds while the other waits. The reference is always
load_sft_dataset on the same file, which the cache never touches."""
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_anchored.data import (ByteTokenizer, DataError, HFTokenizer, cached_sft_dataset,
                                load_sft_dataset)
from nemo_anchored.data.cache import MANIFEST
from tests.launch import free_port
from tests.test_data import TINY_PREFIX, example, tiny_tokenizer, write_jsonl

TOK = ByteTokenizer()
SEQ = 8
# Kept, skipped (malformed), truncated (over SEQ positions), kept: the report has every kind.
LINES = [example("ab", "cd"), "{not json", example("abcdef", "ghijkl"), example("x", "yz")]


def cached(path, cache_dir, tokenizer=TOK, seq_length=SEQ):
    return cached_sft_dataset(path, tokenizer, seq_length, on_error="skip",
                              cache_dir=cache_dir)


def assert_same_data(got, want):
    """Every row, mask and report field alike (the report's cache note aside)."""
    assert len(got) == len(want)
    for name in ("tokens", "labels", "loss_mask"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert {**vars(got.report), "cache": ""} == {**vars(want.report), "cache": ""}


def cache_dirs(cache_dir):
    return sorted(path.name for path in Path(cache_dir).iterdir())


def test_second_start_reads_what_the_first_built(tmp_path):
    path = write_jsonl(tmp_path, LINES)
    reference = load_sft_dataset(path, TOK, SEQ, on_error="skip")
    assert reference.report.skipped and reference.report.truncated  # the report is not trivial

    cold = cached(path, tmp_path / "cache")
    [name] = cache_dirs(tmp_path / "cache")  # nothing staged is left behind
    directory = tmp_path / "cache" / name
    manifest = (directory / MANIFEST).stat()
    warm = cached(path, tmp_path / "cache")

    for dataset in (cold, warm):
        assert_same_data(dataset, reference)
        # Rows come from the cache files, mapped, not from a copy in memory.
        assert isinstance(dataset.ids, np.memmap)
        assert Path(dataset.ids.filename).parent == directory
    assert cold.report.cache.startswith(f"{directory} (built in ")
    assert warm.report.cache == f"{directory} (read)"
    assert warm.report.summary() == reference.report.summary() + \
        f"\n  tokens cached in {directory} (read)"
    assert (directory / MANIFEST).stat().st_mtime_ns == manifest.st_mtime_ns  # not rewritten
    assert cache_dirs(tmp_path / "cache") == [name]
    assert cached_sft_dataset(path, TOK, SEQ, on_error="skip", cache_dir=None).report.cache == ""


def _truncate(file):
    with open(file, "r+b") as stream:
        stream.truncate(file.stat().st_size - 3)


def _flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))


DAMAGE = {
    "truncated ids": ("ids.npy", _truncate, "ids.npy has"),
    "flipped byte": ("assistant.npy", _flip_last_byte, "assistant.npy does not match its CRC-32"),
    "no manifest": (MANIFEST, os.remove, f"no {MANIFEST}"),
    "torn manifest": (MANIFEST, _truncate, f"unreadable {MANIFEST}"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    file_name, damage_fn, reason = DAMAGE[damage]
    path = write_jsonl(tmp_path, LINES)
    reference = load_sft_dataset(path, TOK, SEQ, on_error="skip")
    cached(path, tmp_path / "cache")
    [name] = cache_dirs(tmp_path / "cache")
    directory = tmp_path / "cache" / name
    damage_fn(directory / file_name)

    with caplog.at_level(logging.WARNING, logger="nemo_anchored.data.cache"):
        rebuilt = cached(path, tmp_path / "cache")
    [warning] = caplog.messages
    assert warning.startswith(f"data cache {directory} is unusable ({reason}")
    assert warning.endswith("): rebuilding it")
    assert rebuilt.report.cache.startswith(f"{directory} (built in ")
    assert_same_data(rebuilt, reference)
    caplog.clear()
    assert cached(path, tmp_path / "cache").report.cache == f"{directory} (read)"
    assert not caplog.messages and cache_dirs(tmp_path / "cache") == [name]


def test_changed_inputs_build_a_new_cache(tmp_path):
    cache = tmp_path / "cache"
    path = write_jsonl(tmp_path, [example("hi how", "fine thanks"), example("hi", "how are you")])
    first = cached(path, cache)
    assert first.report.cache.startswith(f"{cache / path.name}.")  # named after the file

    # Data edited in place, same size: only its content tells.
    path.write_text(path.read_text().replace("fine", "FINE"))
    edited = cached(path, cache)
    assert_same_data(edited, load_sft_dataset(path, TOK, SEQ, on_error="skip"))
    assert not torch.equal(edited.tokens, first.tokens)

    # Another tokenizer; a changed chat template; a copy of the first tokenizer elsewhere.
    folder = tiny_tokenizer(tmp_path / "tok", TINY_PREFIX)
    no_bos = tiny_tokenizer(tmp_path / "tok_no_bos", TINY_PREFIX.replace("{{ bos_token }}", ""))
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "tok")
    tiny, tiny_no_bos, tiny_copy = (HFTokenizer(f) for f in (folder, no_bos, copy))
    by_tiny = cached(path, cache, tiny)
    by_no_bos = cached(path, cache, tiny_no_bos)
    assert_same_data(by_tiny, load_sft_dataset(path, tiny, SEQ, on_error="skip"))
    assert_same_data(by_no_bos, load_sft_dataset(path, tiny_no_bos, SEQ, on_error="skip"))
    assert not torch.equal(by_tiny.tokens, by_no_bos.tokens)
    assert cached(path, cache, tiny_copy).report.cache == by_tiny.report.cache.split(" (")[0] + \
        " (read)"

    # Another seq_length (and so every other setting in the key).
    longer = cached(path, cache, seq_length=SEQ + 4)
    assert longer.seq_length == SEQ + 4 and "(built in" in longer.report.cache

    directories = {d.report.cache.split(" (")[0]
                   for d in (first, edited, by_tiny, by_no_bos, longer)}
    assert len(directories) == 5 and len(cache_dirs(cache)) == 5


def test_a_build_that_finds_its_key_published_meanwhile_keeps_that_copy(tmp_path):
    # What a second job building the same data at the same time does after the first one
    # published: its own finished copy is discarded, the published one is kept as it is.
    from nemo_anchored.data.cache import _write, cache_key

    path = write_jsonl(tmp_path, LINES)
    dataset = cached(path, tmp_path / "cache")
    directory = Path(dataset.report.cache.split(" (")[0])
    manifest = (directory / MANIFEST).stat().st_mtime_ns
    settings = {"seq_length": SEQ, "on_error": "skip", "overlong": "truncate"}
    _write(dataset, cache_key(path, TOK, settings), directory)
    assert cache_dirs(tmp_path / "cache") == [directory.name]
    assert (directory / MANIFEST).stat().st_mtime_ns == manifest
    assert cached(path, tmp_path / "cache").report.cache == f"{directory} (read)"


def test_an_unwritable_cache_directory_names_the_key(tmp_path):
    path = write_jsonl(tmp_path, LINES)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DataError, match=rf"^data.cache_dir={blocker / 'cache'}: cannot write "):
        cached(path, blocker / "cache")


def _rank_main(rank, port, work):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    work = Path(work)
    try:
        dataset = cached(work / "data.jsonl", work / "cache")
        returned = time.time()
        try:
            cached_sft_dataset(work / "bad.jsonl", TOK, SEQ, cache_dir=work / "cache")
            error = None
        except DataError as raised:
            error = str(raised)
        result = {"batch": {k: v.tolist() for k, v in dataset.batch(range(len(dataset))).items()},
                  "report": {**vars(dataset.report)}, "file": str(dataset.ids.filename),
                  "returned": returned, "error": error}
        (work / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_rank_builds_the_other_waits_and_reads(tmp_path):
    path = write_jsonl(tmp_path, LINES)
    write_jsonl(tmp_path, [example("ab", "cd"), "{not json"], name="bad.jsonl")
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    reference = load_sft_dataset(path, TOK, SEQ, on_error="skip")
    want = {k: v.tolist() for k, v in reference.batch(range(len(reference))).items()}
    [name] = cache_dirs(tmp_path / "cache")  # the bad file left nothing behind
    directory = tmp_path / "cache" / name
    for result in ranks:
        assert result["batch"] == want
        assert {**result["report"], "cache": "", "skipped": [tuple(s) for s in
                                                            result["report"]["skipped"]]} == \
            {**vars(reference.report), "cache": ""}
        assert Path(result["file"]).parent == directory
        # Rank 0's error (the bad line, with its file and line number) reaches rank 1 too.
        assert result["error"] == f"{tmp_path / 'bad.jsonl'}:2: malformed JSON (Expecting " \
                                  "property name enclosed in double quotes at column 2)"
    assert ranks[0]["report"]["cache"].startswith(f"{directory} (built in ")
    assert ranks[1]["report"]["cache"] == f"{directory} (read)"
    # Rank 1 came back only once rank 0 had published the cache.
    assert ranks[1]["returned"] >= (directory / MANIFEST).stat().st_mtime
