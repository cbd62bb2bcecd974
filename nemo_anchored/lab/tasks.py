"""Deterministic task generators for the lab: general skills and an iGSM-like domain task.

Every example is ``{"prompt": str, "response": str, "task": str}`` with one exact answer.

General tasks (formats ``<op> <args>=`` with the answer after ``=``):
    get   key-value look-up              ``get a3c7b1 c=`` -> ``7``
    rev   string reversal                    ``rev kqzm=``     -> ``mzqk``
    srt   sort the letters                   ``srt kqzm=``     -> ``kmqz``
    cd    countdown-style: the one operator  ``cd 7?6=42``     -> ``*``
          (of + - *) that makes ``a ? b`` equal the target (puzzles with two are not generated)

Domain task (iGSM-like, a different format: a chain of assignments, then a question):
    ``t=7;p=t+1;q=p+1;q?`` -> ``9``   (1-3 derived variables, each the previous one plus 1,
    mod 10 like iGSM's mod-23 arithmetic; the last variable is asked)

``gen_add`` (2-digit + 1-digit addition, ``add 47+8=`` -> ``55``) is kept but not in the
general mix: the lab's tiny model learned it to only ~0.08 in pretraining; ``get`` replaced it.

``make_splits`` draws distinct prompts from a seeded RNG and cuts them into train and held-out
sets that share no prompt.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Sequence

Example = Dict[str, str]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
GENERAL_TASKS = ("get", "rev", "srt", "cd")
DOMAIN_MOD = 10
DOMAIN_OPS = ("+",)
DOMAIN_NAMES = "pqrstuvwxyz"
DOMAIN_MAX_STEPS = 3


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def gen_add(rng: random.Random, max_digits: int = 2) -> Example:
    """A ``max_digits``-digit number plus a one-digit number (carries included)."""
    a = rng.randint(10 ** (max_digits - 1), 10 ** max_digits - 1)
    b = rng.randint(0, 9)
    return {"prompt": f"add {a}+{b}=", "response": str(a + b), "task": "add"}


def gen_rev(rng: random.Random, max_len: int = 4) -> Example:
    w = _word(rng, 2, max_len)
    return {"prompt": f"rev {w}=", "response": w[::-1], "task": "rev"}


def gen_srt(rng: random.Random, max_len: int = 4) -> Example:
    w = _word(rng, 2, max_len)
    return {"prompt": f"srt {w}=", "response": "".join(sorted(w)), "task": "srt"}


def gen_get(rng: random.Random, min_keys: int = 2, max_keys: int = 4) -> Example:
    """Key-value look-up: distinct letter keys with digit values, then the key asked for."""
    keys = rng.sample(LETTERS, rng.randint(min_keys, max_keys))
    values = [rng.randint(0, 9) for _ in keys]
    asked = rng.randrange(len(keys))
    table = "".join(f"{k}{v}" for k, v in zip(keys, values))
    return {"prompt": f"get {table} {keys[asked]}=", "response": str(values[asked]),
            "task": "get"}


def countdown_ops(a: int, b: int, target: int) -> List[str]:
    """The operators of + - * with ``a op b == target``."""
    return [op for op, v in (("+", a + b), ("-", a - b), ("*", a * b)) if v == target]


def gen_cd(rng: random.Random, max_value: int = 25) -> Example:
    while True:
        a, b = rng.randint(1, max_value), rng.randint(1, max_value)
        op = rng.choice(("+", "-", "*"))
        target = {"+": a + b, "-": a - b, "*": a * b}[op]
        if countdown_ops(a, b, target) == [op]:  # exactly one answer
            return {"prompt": f"cd {a}?{b}={target}", "response": op, "task": "cd"}


GENERATORS: Dict[str, Callable[[random.Random], Example]] = {
    "add": gen_add, "get": gen_get, "rev": gen_rev, "srt": gen_srt, "cd": gen_cd}


def gen_domain(rng: random.Random, min_steps: int = 1, max_steps: int = DOMAIN_MAX_STEPS,
               ops: Sequence[str] = DOMAIN_OPS) -> Example:
    """A chain of assignments: a constant, then 1-3 derived variables, each the previous
    variable plus one (``name=prev+1``, mod 10); the question asks for the last one.

    Deliberately small (one operation, a linear chain, the last variable asked): probes with
    the lab's 2-layer model showed richer variants (two constants, var op var, + - *, any
    variable asked, or +1..+3 increments) stayed at 0.3-0.6 held-out accuracy after the quick
    budget's 128 SFT steps (the model never learned name look-up), this one ~0.8-0.9 at 1e-3."""
    steps = rng.randint(min_steps, max_steps)
    names = rng.sample(DOMAIN_NAMES, 1 + steps)
    value = rng.randint(0, DOMAIN_MOD - 1)
    parts = [f"{names[0]}={value}"]
    for prev, name in zip(names, names[1:]):
        op = rng.choice(tuple(ops))
        value = {"+": value + 1, "-": value - 1}[op] % DOMAIN_MOD
        parts.append(f"{name}={prev}{op}1")
    return {"prompt": ";".join(parts) + f";{names[-1]}?", "response": str(value),
            "task": "domain"}


def _distinct(draw: Callable[[], Example], n: int, exclude: set = frozenset()) -> List[Example]:
    seen, out = set(exclude), []
    for _ in range(n * 200):
        ex = draw()
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
            if len(out) == n:
                return out
    raise ValueError(f"could only draw {len(out)} distinct examples of {n}")


def make_splits(kind: str, n_train: int, n_eval: int, seed: int,
                tasks: Sequence[str] = GENERAL_TASKS) -> Dict[str, List[Example]]:
    """{"train": [...], "eval": [...]} for ``kind`` "general" (tasks mixed evenly, round robin)
    or "domain"; deterministic in ``seed``; no prompt is in both splits."""
    if kind == "general":
        train: List[Example] = []
        evals: List[Example] = []
        per_train, per_eval = -(-n_train // len(tasks)), -(-n_eval // len(tasks))
        for task in tasks:
            rng = random.Random(f"general:{task}:{seed}")
            pool = _distinct(lambda: GENERATORS[task](rng), per_train + per_eval)
            train.append(pool[:per_train])
            evals.append(pool[per_train:])
        # Interleave the tasks (round robin), then cut to the requested sizes.
        mix = lambda groups: [ex for row in zip(*groups) for ex in row]  # noqa: E731
        return {"train": mix(train)[:n_train], "eval": mix(evals)[:n_eval]}
    if kind != "domain":
        raise ValueError(f"unknown task kind {kind!r} (general | domain)")
    rng = random.Random(f"domain:{seed}")

    def draw():
        return gen_domain(rng)
    pool = _distinct(draw, n_train + n_eval)
    return {"train": pool[:n_train], "eval": pool[n_train:]}


__all__ = ["GENERAL_TASKS", "GENERATORS", "countdown_ops", "gen_domain", "gen_get", "make_splits"]
