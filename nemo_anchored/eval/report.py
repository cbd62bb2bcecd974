"""The experiment's table: every method's domain score and general scores, from the
``eval_NAME.json`` files that `nemo-anchored eval --out` wrote into one directory.

    nemo-anchored report RUNS_DIR --domain gsm_symbolic   (cli/report.py)

"General retention" is the mean general score over the base's (MMLU and HumanEval), so 100%
means nothing forgotten. Writes nothing itself: scripts/experiment.sh tees it to results.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

ORDER = ("base", "sft", "anchored", "low_sft", "kl_sft", "dft", "stm")
GENERAL = ("mmlu", "humaneval")


def load_scores(folder: Path) -> Dict[str, dict]:
    """{run name: {task: summary}} of every eval_NAME.json in ``folder``."""
    scores = {}
    for path in sorted(folder.glob("eval_*.json")):
        scores[path.stem[len("eval_"):]] = json.loads(path.read_text())["tasks"]
    if not scores:
        raise FileNotFoundError(f"{folder}: no eval_*.json (run `nemo-anchored eval --out`)")
    return scores


def retention(tasks: dict, base: dict) -> Optional[float]:
    """Mean over the general tasks of score / base score (None when the base scored 0)."""
    ratios = [tasks[t]["score"] / base[t]["score"] for t in GENERAL
              if t in tasks and t in base and base[t]["score"] > 0]
    return sum(ratios) / len(ratios) if ratios else None


def table(scores: Dict[str, dict], domain: str) -> str:
    names = [n for n in ORDER if n in scores] + sorted(set(scores) - set(ORDER))
    lines = [f"| method | {domain} | " + " | ".join(GENERAL) + " | general retention |",
             "|---|---|" + "---|" * len(GENERAL) + "---|"]
    base = scores.get("base")
    for name in names:
        tasks = scores[name]
        cells = []
        for task in (domain, *GENERAL):
            t = tasks.get(task)
            cells.append("n/a" if t is None else f"{t['score']:.3f} ({t['correct']}/{t['n']})")
        kept = retention(tasks, base) if base else None
        lines.append(f"| {name} | " + " | ".join(cells) + " | "
                     + ("n/a" if kept is None else f"{kept:.0%}") + " |")
    return "\n".join(lines)
