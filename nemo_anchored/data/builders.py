"""Offline task builders: GSM-style math, countdown and medical calculations as chat JSONL,
what `nemo-anchored data build` (cli/data.py) writes.

Every example has the format of data/task_format.py (a worked solution whose last line is
``Answer: <answer>``), with ``"metadata"`` where its scorer (nemo_anchored.eval.scoring) needs
more than the answer: countdown the numbers and the target, medcalc the calculator and its
output type.

Sources (offline PyPI packages, nothing from a hub):
    gsm_symbolic  reasoning-gym's GSM-Symbolic templates; the solution is the generator's
                  chain of thought with its ``#### N`` line replaced by ``Answer: N``
    countdown     reasoning-gym's countdown (reach a target with 4-6 numbers); the solution
                  evaluates the generator's expression one operation at a time (exact fractions)
    medcalc       medcalc-bench's calculators on sampled patient values (data/medcalc.py);
                  the note states every value the calculator uses, the solution is the
                  calculator's own explanation, the answer its result

Determinism: example i of a task at seed S depends on (task, S, i) alone, and examples whose
question text repeats an earlier one are dropped, so ``build(task, n, S)`` is a prefix of
``build(task, m, S)`` for n <= m. ``build_splits`` takes the test split first and the training
split after it from that one de-duplicated stream: the two never share a question.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
from fractions import Fraction
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

from nemo_anchored.atomic import write_text
from nemo_anchored.data.medcalc import medcalc_stream
from nemo_anchored.data.task_format import chat_example, question_of

TASKS = ("gsm_symbolic", "countdown", "medcalc")
# Candidates tried per requested example before a task is declared too small for `n` unique
# questions (the generators repeat a question only rarely).
_MAX_TRIES_PER_EXAMPLE = 20


# ------------------------------------------------------------------------------ gsm_symbolic

def _reasoning_gym(name: str, seed: int, draws: int):
    """reasoning-gym's ``name`` generator for ``draws`` items. Its item i is drawn from
    ``Random(seed + i)``, so consecutive seeds would share items shifted by one: the seed it
    gets is a hash of ours, which puts different seeds' streams far apart."""
    import reasoning_gym

    digest = hashlib.sha256(f"{name}/{seed}".encode()).digest()
    return reasoning_gym.create_dataset(name, size=max(draws, 1),
                                        seed=int.from_bytes(digest[:4], "little"))


def _gsm_symbolic(seed: int, draws: int) -> Iterator[dict]:
    data = _reasoning_gym("gsm_symbolic", seed, draws)
    for index in range(draws):
        item = data[index]
        cot = item["metadata"]["answer_cot"]
        match = re.search(r"\n#### (.+?)\s*$", cot)
        if match is None or float(match.group(1)) != float(item["answer"]):
            raise ValueError(f"gsm_symbolic (seed {seed}, item {index}): the chain of thought "
                             f"does not end in '#### {item['answer']}': {cot[-80:]!r}")
        yield chat_example("gsm_symbolic", item["question"], cot[:match.start()], item["answer"],
                       "number")


# --------------------------------------------------------------------------------- countdown

_COUNTDOWN_FORMAT = "\n\nFinal answer format instructions:"
_OPERATORS = {ast.Add: ("+", lambda a, b: a + b), ast.Sub: ("-", lambda a, b: a - b),
              ast.Mult: ("*", lambda a, b: a * b), ast.Div: ("/", lambda a, b: a / b)}


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(value)


def countdown_steps(expression: str) -> Tuple[List[str], Fraction]:
    """The binary operations of an arithmetic expression in evaluation order, as
    ``"a op b = c"`` lines (exact fractions), and its value."""
    steps: List[str] = []

    def evaluate(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = evaluate(node.left), evaluate(node.right)
            symbol, apply = _OPERATORS[type(node.op)]
            value = apply(left, right)
            steps.append(f"{_fraction_text(left)} {symbol} {_fraction_text(right)} = "
                         f"{_fraction_text(value)}")
            return value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            operand = evaluate(node.operand)
            if not isinstance(node.operand, ast.Constant):  # a literal -59 is no step
                steps.append(f"-({_fraction_text(operand)}) = {_fraction_text(-operand)}")
            return -operand
        raise ValueError(f"countdown expression {expression!r}: unsupported element "
                         f"{ast.dump(node)}")

    value = evaluate(ast.parse(expression, mode="eval").body)
    return steps, value


def _countdown(seed: int, draws: int) -> Iterator[dict]:
    data = _reasoning_gym("countdown", seed, draws)
    for index in range(draws):
        item = data[index]
        meta = item["metadata"]
        question, found, _ = item["question"].partition(_COUNTDOWN_FORMAT)
        steps, value = countdown_steps(item["answer"])
        if not found or value != meta["target"]:
            raise ValueError(f"countdown (seed {seed}, item {index}): unexpected item "
                             f"{item['question'][:80]!r} / {item['answer']!r}")
        solution = "\n".join(steps) + f"\nThe expression {item['answer']} reaches {meta['target']}."
        # "exactly once": the question asks for all the numbers, as the scorer does.
        yield chat_example("countdown", question, solution, item["answer"],
                           "arithmetic expression using each number exactly once, with * and /",
                           {"numbers": list(meta["numbers"]), "target": meta["target"]})


# ---------------------------------------------------------------------------------- building

_GENERATORS: Dict[str, Callable[[int, int], Iterator[dict]]] = {
    "gsm_symbolic": _gsm_symbolic, "countdown": _countdown, "medcalc": medcalc_stream}


def build(task: str, n: int, seed: int) -> List[dict]:
    """The first ``n`` examples of ``task`` at ``seed`` with distinct questions."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r} (expected one of: {', '.join(TASKS)})")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # Item i of a generator does not depend on `draws` (the streams are prefix-stable).
    draws = n * _MAX_TRIES_PER_EXAMPLE + 100
    seen, examples = set(), []
    for example in _GENERATORS[task](seed, draws):
        if len(examples) == n:
            break
        if question_of(example) not in seen:
            seen.add(question_of(example))
            examples.append(example)
    if len(examples) < n:
        raise ValueError(f"{task}: only {len(examples)} distinct questions in {draws} draws, "
                         f"{n} requested")
    return examples


def build_splits(task: str, n_train: int, n_test: int, seed: int) -> Tuple[List[dict], List[dict]]:
    """Disjoint (train, test) lists: the test split is the first ``n_test`` distinct examples,
    the training split the ``n_train`` after them (a test set stays the same whatever n_train)."""
    examples = build(task, n_test + n_train, seed)
    return examples[n_test:], examples[:n_test]


def write_jsonl(path, examples: Sequence[dict]) -> None:
    """One JSON object per line, written atomically."""
    write_text(path, "".join(json.dumps(example, ensure_ascii=False) + "\n"
                             for example in examples))

