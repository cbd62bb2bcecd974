"""The format of a built task example, shared by the builders and the scorers.

Every example is ``{"messages": [user, assistant], "answer": str, "task": str}``, plus
``"metadata"`` where its scorer needs more than the answer. The user turn ends with an
instruction naming the final line's format; the assistant turn is a worked solution whose last
line is ``Answer: <answer>``: the one format every scorer parses (``extract_final_answer``).
"""
from __future__ import annotations

import re
from typing import Optional

ANSWER_PREFIX = "Answer:"

# Horizontal white space only around the prefix, the answer stripped after the match: \s at
# both ends made the search quadratic in runs of blank lines or spaces (seconds at 30k).
_FINAL_ANSWER = re.compile(r"^[ \t]*Answer:(.*)$", re.MULTILINE)


def extract_final_answer(text: str) -> Optional[str]:
    """The answer on the last ``Answer: ...`` line of ``text``, stripped (None when there is
    none)."""
    matches = _FINAL_ANSWER.findall(text)
    return matches[-1].strip() if matches else None


def _instruction(what: str) -> str:
    return (f"\n\nSolve the problem step by step. End your response with a final line of the "
            f"form '{ANSWER_PREFIX} <{what}>'.")


def chat_example(task: str, question: str, solution: str, answer: str, what: str,
                 metadata: Optional[dict] = None) -> dict:
    """An example of ``task``: ``question`` with the instruction to end in ``Answer: <what>``,
    and ``solution`` followed by that final line."""
    example = {"messages": [{"role": "user", "content": question + _instruction(what)},
                            {"role": "assistant",
                             "content": f"{solution.rstrip()}\n{ANSWER_PREFIX} {answer}"}],
               "answer": answer, "task": task}
    if metadata is not None:
        example["metadata"] = metadata
    return example


def question_of(example: dict) -> str:
    """The user turn of an example: what de-duplication and the splits compare."""
    return example["messages"][0]["content"]
