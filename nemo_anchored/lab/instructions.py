"""Instruction-following checks with verifiable answers, built offline: a general skill of the
real-model lab (lab/real_model.py) closer to the paper's IFEval than MMLU is, at a level a
135M-parameter chat model can do.

Each item is one user turn and a rule its response must follow:

    repeat      "Repeat the word W and write nothing else": the response, stripped of spaces,
                quotes and a final full stop, is W (any case)
    uppercase   "Write the word W in capital letters": W.upper() appears in the response
    sum         "What is A + B? Reply with the number only": the response's first number is
                A + B
    end_with    "Name a colour. End your reply with the word W": the response's last word,
                without punctuation, is W (any case)

None of them can be met by chance (the rule's chance level is 0).
"""
from __future__ import annotations

import random
import re
from typing import List

KINDS = ("repeat", "uppercase", "sum", "end_with")
_WORDS = ("apple", "river", "garden", "window", "silver", "pencil", "orange", "planet",
          "forest", "candle", "bridge", "rabbit", "yellow", "castle", "button", "ocean",
          "mirror", "ladder", "basket", "thunder", "lemon", "rocket", "violin", "meadow")


def build_instructions(n: int, seed: int) -> List[dict]:
    """``n`` items ({"kind", "prompt", "target"}), the kinds in turn, words and numbers drawn
    with ``seed``."""
    if n < 0:
        raise ValueError(f"build_instructions: n must be >= 0, got {n}")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind, word = KINDS[i % len(KINDS)], rng.choice(_WORDS)
        if kind == "repeat":
            prompt, target = f"Repeat the word {word} and write nothing else.", word
        elif kind == "uppercase":
            prompt, target = f"Write the word {word} in capital letters.", word.upper()
        elif kind == "sum":
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            prompt, target = f"What is {a} + {b}? Reply with the number only.", str(a + b)
        else:
            prompt = f"Name a colour. End your reply with the word {word}."
            target = word
        items.append({"kind": kind, "prompt": prompt, "target": target})
    return items


def follows(item: dict, response: str) -> bool:
    """Whether ``response`` follows ``item``'s rule (module docstring)."""
    kind, target = item["kind"], item["target"]
    if kind == "repeat":
        return response.strip().strip("\"'").rstrip(".").strip().lower() == target
    if kind == "uppercase":
        return target in response
    if kind == "sum":
        number = re.search(r"-?\d+", response)
        return number is not None and number[0] == target
    if kind == "end_with":
        words = re.findall(r"[A-Za-z]+", response)
        return bool(words) and words[-1].lower() == target
    raise ValueError(f"unknown instruction kind {kind!r} (expected one of {KINDS})")
