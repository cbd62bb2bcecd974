"""Scoring a model's response: HumanEval programs run in a sandboxed interpreter, and the
built tasks' final answers checked by their task's scorer (the rules, per task, are in
eval/benchmarks.py's docstring)."""
from __future__ import annotations

import functools
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from nemo_anchored.data.task_format import extract_final_answer

MEDCALC_RELATIVE_TOLERANCE = 0.05
HUMANEVAL_TIMEOUT_S = 10.0


# -------------------------------------------------------------------------------- HumanEval

# A fenced block with any info string (```python3, ```PY, none...): a fence that requires a
# known tag lets the block's closing fence open a "block" of the prose after it.
_FENCED = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


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
    """Run ``program`` in a fresh isolated interpreter: "passed" (it ran to its end and exited
    with status 0), "failed: ..." (the last line of its stderr) or "timed out" (its whole process
    group is killed).

    Status 0 alone is not a pass: a completion that calls ``sys.exit(0)``, ``exit()`` or
    ``unittest.main()`` ends the program with status 0 before the tests run. The program's last
    statement creates a file of a random name, which only a program that got there has made."""
    with tempfile.TemporaryDirectory(prefix="nemo_anchored_eval_") as workdir:
        script, reached_end = Path(workdir) / "program.py", Path(workdir) / secrets.token_hex(16)
        # By its full path: the program may have changed its working directory.
        script.write_text(f"{_PRELUDE}{program}\nopen({str(reached_end)!r}, 'x').close()\n",
                          encoding="utf-8")
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
        finished = reached_end.exists()
    if proc.returncode == 0:
        return "passed" if finished else "failed: exited (status 0) before the end of the tests"
    lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
    return f"failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"


# ------------------------------------------------------------------------------ built tasks

@functools.lru_cache(maxsize=None)
def _gym_scorer(name: str):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=1, seed=0).score_answer


def score_gsm_symbolic(answer: Optional[str], example: dict) -> bool:
    # reasoning-gym's rule (the first number equals the answer) with first_number's parse: the
    # gym's own regex reads "2,205" as 2 and "-5" as 5.
    value = first_number(answer)
    return value is not None and value == float(example["answer"])


_COUNTDOWN_EXPRESSION = re.compile(r"[0-9+\-*/() ]{1,200}")
# What a response may add around the expression: code quotes, a closing period, "= <value>".
_COUNTDOWN_DECORATION = re.compile(r"[\s`]*(.*?)(?:\s*=\s*(-?\d+(?:\.\d+)?))?[\s`.]*",
                                   re.DOTALL)


def score_countdown(answer: Optional[str], example: dict) -> bool:
    if answer is None:
        return False
    meta = example["metadata"]
    expression, value = _COUNTDOWN_DECORATION.fullmatch(
        answer.translate(_TYPOGRAPHIC_OPERATORS)).groups()
    if value is not None and float(value) != meta["target"]:
        return False  # the expression may reach the target, the response says it does not
    if not _COUNTDOWN_EXPRESSION.fullmatch(expression) or "**" in expression:
        return False
    entry = {"metadata": {"numbers": meta["numbers"], "target": meta["target"]}}
    return _gym_scorer("countdown")(expression, entry) == 1.0


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
# The minus sign, the en dash and the multiplication and division signs a model may write.
_TYPOGRAPHIC_OPERATORS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00d7": "*",
                                        "\u00f7": "/"})


def first_number(text: Optional[str]) -> Optional[float]:
    """The first number in ``text`` (thousands separators and a typographic minus allowed), or
    None."""
    match = _NUMBER.search((text or "").translate(_TYPOGRAPHIC_OPERATORS))
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
