"""What a resume finds on disk, in plain Python (no torch, no megatron): the metrics file cut
back after a crash, checkpoint directories that cannot be used, per-file checksums, and the
messages for directories that are no checkpoint. The same on real checkpoints (saved, damaged,
loaded) is in tests/test_checkpoint.py."""
import json
import zlib

import pytest

from nemo_anchored.checkpoint.format import (MARKER, CheckpointError, file_record,
                                             latest_checkpoint, read_marker, record_files,
                                             scan_checkpoints, verify_files)
from nemo_anchored.training.metrics import MetricsFileError, MetricsLogger


def write_checkpoint(path, step, files=None):
    """A directory shaped like a complete checkpoint at ``step``: data files (``files``:
    {name: bytes}) and a marker recording their checksums."""
    path.mkdir(parents=True)
    files = files or {"__0_0.distcp": b"weights" * 100, ".metadata": b"index"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    marker = {"format_version": 1, "global_step": step, "saved_at": float(step)}
    record_files(marker, {name: file_record(path / name) for name in files})
    (path / MARKER).write_text(json.dumps(marker))
    return path


# ---------------------------------------------------------------------------- metrics.jsonl


def records(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def resume_metrics(run_dir, step):
    logger = MetricsLogger(run_dir, total_steps=10, resume_step=step, enabled=True,
                           tensorboard=False, progress=False)
    logger.close()
    return (run_dir / "metrics.jsonl").read_text()


@pytest.mark.parametrize("torn", [b'{"step": 5, "lo', b"\0\0\0\0",
                                  '{"step": 5, "note": "\xe9'.encode()[:-1]],
                         ids=["cut_record", "zero_bytes", "cut_inside_a_character"])
def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys, torn):
    """A crash or a full disk mid-write leaves a partial last line: it is dropped and the
    warning names the file and line; the other records are cut back to the step as usual."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(records(1, 2, 3, 4).encode() + torn)
    assert resume_metrics(tmp_path, 3) == records(1, 2, 3)
    assert f"{path} line 5 is an incomplete record" in capsys.readouterr().err


def test_damaged_metrics_line_before_the_last_stops_the_resume(tmp_path):
    """Not a torn write: the error names the file and the line, and the file is kept as is."""
    path = tmp_path / "metrics.jsonl"
    text = records(1) + '{"step": 2, "lo\n' + records(3)
    path.write_text(text)
    with pytest.raises(MetricsFileError, match=f"{path} line 2 is not a metrics record"):
        resume_metrics(tmp_path, 3)
    assert path.read_text() == text


# ------------------------------------------------------------------------ scan_checkpoints


def test_scan_reports_every_checkpoint_it_cannot_use(tmp_path):
    good = write_checkpoint(tmp_path / "step_0000002", 2)
    unreadable = write_checkpoint(tmp_path / "step_0000005", 5)
    (unreadable / MARKER).write_text('{"format_version": 1, "glob')
    unmarked = write_checkpoint(tmp_path / "step_0000007", 7)
    (unmarked / MARKER).unlink()
    # Valid JSON, damaged by hand: a step that no longer orders (it raised a TypeError in the
    # scan, which broke the resume of the whole folder).
    mistyped = write_checkpoint(tmp_path / "step_0000008", 8)
    marker = json.loads((mistyped / MARKER).read_text())
    (mistyped / MARKER).write_text(json.dumps({**marker, "global_step": "8"}))
    write_checkpoint(tmp_path / "step_0000009.tmp", 9)  # a save in progress: not reported
    (tmp_path / "tensorboard").mkdir()  # no checkpoint files: not a checkpoint

    scan = scan_checkpoints(tmp_path)
    assert scan.latest == good == latest_checkpoint(tmp_path)
    assert [path for path, _ in scan.skipped] == [unreadable, unmarked, mistyped]
    reasons = dict(scan.skipped)
    assert f"checkpoint {unreadable}: unreadable {MARKER}" in reasons[unreadable]
    assert f"checkpoint {unmarked} is incomplete: no {MARKER}" in reasons[unmarked]
    assert reasons[mistyped] == f"checkpoint {mistyped}: unreadable {MARKER}: 'global_step' " \
                                "is '8', not an integer or null"


def test_scan_with_only_unusable_checkpoints_has_no_latest(tmp_path):
    """What a resume must stop at rather than start from step 0."""
    only = write_checkpoint(tmp_path / "step_0000004", 4)
    (only / MARKER).write_text("{")
    scan = scan_checkpoints(tmp_path)
    assert scan.latest is None and [path for path, _ in scan.skipped] == [only]
    assert scan_checkpoints(tmp_path / "missing").skipped == []


# ------------------------------------------------------------------------------- checksums


def test_checksums_are_recorded_and_verified(tmp_path):
    data = bytes(range(256)) * 1000
    ckpt = write_checkpoint(tmp_path / "ckpt", 1, {"__0_0.distcp": data, "common.pt": b"x"})
    marker = read_marker(ckpt)
    assert marker["files"]["__0_0.distcp"] == {"bytes": len(data),
                                               "crc32": f"{zlib.crc32(data):08x}"}
    verify_files(ckpt, marker)

    damaged = bytearray(data)
    damaged[1234] ^= 0x01
    (ckpt / "__0_0.distcp").write_bytes(damaged)
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt}: file __0_0.distcp is "
                                              "corrupt: checksum mismatch"):
        verify_files(ckpt, marker)
    verify_files(ckpt, marker, ["common.pt"])  # only the files asked for

    (ckpt / "__0_0.distcp").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match=f"file __0_0.distcp is truncated: 1000 bytes, "
                                              f"{len(data)} when saved"):
        verify_files(ckpt, marker)
    (ckpt / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="file __0_0.distcp is missing"):
        verify_files(ckpt, marker)


def test_a_marker_without_checksums_verifies_nothing(tmp_path):
    """Checkpoints saved before checksums were recorded keep loading."""
    ckpt = write_checkpoint(tmp_path / "ckpt", 1)
    marker = read_marker(ckpt)
    del marker["files"]
    (ckpt / "__0_0.distcp").write_bytes(b"anything")
    verify_files(ckpt, marker)


# ------------------------------------------------------------------------ read_marker texts


def test_a_hugging_face_folder_says_how_to_convert_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a Hugging Face model folder") as error:
        read_marker(tmp_path)
    assert f"nemo-anchored convert hf-to-mcore --hf {tmp_path} --out OUT" in str(error.value)


def test_a_tmp_directory_is_an_incomplete_save_naming_the_one_to_use(tmp_path):
    complete = write_checkpoint(tmp_path / "step_0000002", 2)
    staged = write_checkpoint(tmp_path / "step_0000004.tmp", 4)  # even with its marker
    with pytest.raises(CheckpointError, match="is an incomplete save") as error:
        read_marker(staged)
    assert f"use {complete}, the latest complete checkpoint there" in str(error.value)
    (complete / MARKER).unlink()
    with pytest.raises(CheckpointError, match=f"there is no complete checkpoint in {tmp_path}"):
        read_marker(staged)
