"""The experiment's table: every method's domain score and general scores, from the
``eval_NAME.json`` files that `nemo-anchored eval --out` wrote into one directory.

    python -m nemo_anchored.eval.report RUNS_DIR --domain gsm_symbolic

"General retention" is the mean general score over the base's (MMLU and HumanEval), so 100%
means nothing forgotten. Writes nothing itself: scripts/experiment.sh tees it to results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--domain", required=True, help="the domain task's name")
    args = parser.parse_args(argv)
    try:
        print(table(load_scores(args.folder), args.domain))
    except FileNotFoundError as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
