"""The lab's summary of its runs: seed means and sample stds per method and learning rate, and
per method its general accuracy at matched domain accuracy.

The matched-domain rule: among a method's sweep points (learning rate, and outer iteration)
whose seed-mean domain accuracy reaches at least MATCH_FRACTION (90%) of the best seed-mean SFT
domain accuracy, the one with the best seed-mean general accuracy (``matched_point``). A method
with no such point gets null scores and a note, never a made-up number. Only points with every
seed of the lab count, for the bar as for the match: a point some of whose runs failed
(diverged, collapsed) would be the mean of the seeds that survived, which flatters it.

Each verdict comes with how close it is (``verdicts``): whether a method reaches the matched
domain accuracy (its seed-mean domain against the bar), and for one that does, its general
accuracy there against SFT's. The margin is the difference of the two seed means; the spread
is sqrt(s1^2 + s2^2) of their sample stds over the seeds, the std of the difference between two
independent runs; a margin smaller than the spread is within the seed noise. The bar's std is
MATCH_FRACTION x the std of SFT's best-domain point.

A curve is a *series* (lab/budget.py: a method in one budget arm at one alpha; "sft" is the equal
arm's, whose best point sets the bar). Its sweep is over the learning rate and, for anchored
series, the outer iteration: every outer iteration's checkpoint is a point of the sweep, with the
compute spent up to it, and the matched point says when it is an intermediate one.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence

MATCH_FRACTION = 0.9
SPREAD = ("margin: the difference of the two seed means compared; spread: sqrt(s1^2 + s2^2) of "
          "their sample stds over the seeds; within noise: |margin| < spread")


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    values = list(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def sweep_table(points: Sequence[dict]) -> Dict[str, List[dict]]:
    """Per series (a point's "series", else its method), per lr and outer iteration
    (ascending): seed-mean and std of domain and general accuracy, and the compute."""
    groups: Dict[str, Dict[tuple, List[dict]]] = {}
    for p in points:
        setting = (float(p["lr"]), p.get("outer") or 0)
        groups.setdefault(p.get("series", p["method"]), {}).setdefault(setting, []).append(p)
    table = {}
    for series, by_setting in groups.items():
        rows = []
        for lr, outer in sorted(by_setting):
            runs = by_setting[lr, outer]
            d, d_std = mean_std([r["domain"] for r in runs])
            g, g_std = mean_std([r["general"] for r in runs])
            rows.append({"method": runs[0]["method"], "lr": lr, "outer": outer or None,
                         "outers": runs[0].get("outers"), "compute": runs[0].get("compute"),
                         "domain": d, "general": g, "domain_std": d_std, "general_std": g_std,
                         "seeds": len(runs)})
        table[series] = rows
    return table


_MATCHED_KEYS = ("domain", "general", "domain_std", "general_std", "lr", "outer", "outers",
                 "compute")


def matched_point(rows: Sequence[dict], threshold: float, seeds: int) -> dict:
    """The summary entry of one series from its sweep rows: among rows of all ``seeds`` with
    seed-mean domain >= threshold, the one with the best general (ties: higher domain, then
    less compute, then lower lr). None scores and a note when no row qualifies; a note when the
    chosen row is an intermediate outer iteration, and one naming the rows left out for their
    failed seeds."""
    complete = _with_every_seed(rows, seeds)
    failed = [r for r in rows if r["seeds"] < seeds]
    notes = [f"left out, some of their {seeds} seeds failed: "
             + ", ".join(f"{_point_name(r)} ({r['seeds']} of {seeds})" for r in failed)] \
        if failed else []
    ok = [r for r in complete if r["domain"] >= threshold - 1e-12]
    if not ok:
        best_domain = max((r["domain"] for r in complete), default=None)
        notes.insert(0, f"no learning rate reaches the matched domain accuracy {threshold:.3f} "
                        f"(best seed-mean domain: "
                        f"{'n/a' if best_domain is None else f'{best_domain:.3f}'})")
        return {**dict.fromkeys(_MATCHED_KEYS), "note": "; ".join(notes)}
    best = max(ok, key=lambda r: (r["general"], r["domain"], -(r.get("compute") or 0),
                                  -r["lr"]))
    found = {k: best.get(k) for k in _MATCHED_KEYS}
    if found["outer"] is not None and found["outer"] < found["outers"]:
        notes.insert(0, f"an intermediate checkpoint: outer iteration {found['outer']} of "
                        f"{found['outers']}")
    if notes:
        found["note"] = "; ".join(notes)
    return found


def _with_every_seed(rows: Sequence[dict], seeds: int) -> List[dict]:
    return [r for r in rows if r["seeds"] == seeds]


def _point_name(row: dict) -> str:
    return f"lr {row['lr']:g}" + ("" if row["outer"] is None else f" outer {row['outer']}")


def summarize(points: Sequence[dict], base: dict) -> dict:
    """results.json's "methods", "sweep", "matched_domain_threshold" and "verdicts" from the
    run points."""
    sweep = sweep_table(points)
    seeds = max((r["seeds"] for rows in sweep.values() for r in rows), default=0)
    sft_rows = _with_every_seed(sweep.get("sft", []), seeds)
    if not sft_rows:
        raise ValueError("the matched-domain rule needs sft runs with every seed")
    best_sft = max(r["domain"] for r in sft_rows)
    threshold = MATCH_FRACTION * best_sft
    methods = {"base": {"domain": base["domain"], "general": base["general"],
                        "domain_std": None, "general_std": None, "lr": None,
                        "note": "one pretrained base, evaluated once: no seed spread"}}
    for series, rows in sweep.items():
        methods[series] = matched_point(rows, threshold, seeds)
    return {"methods": methods, "sweep": sweep, "best_sft_domain": best_sft,
            "matched_domain_threshold": threshold,
            "verdicts": verdicts(sweep, methods, threshold, seeds)}


def _verdict(method: str, verdict: str, row: dict, key: str, against_name: str,
             against: float, against_std: float, seeds: int) -> dict:
    margin = row[key] - against
    spread = math.hypot(row[f"{key}_std"], against_std)
    return {"method": method, "verdict": verdict, "lr": row["lr"], "outer": row["outer"],
            "outers": row["outers"], "value": row[key],
            "value_std": row[f"{key}_std"], "against_name": against_name, "against": against,
            "against_std": against_std, "margin": margin, "spread": spread, "seeds": seeds,
            "within_noise": None if seeds < 2 else abs(margin) < spread}


def verdicts(sweep: Dict[str, List[dict]], methods: Dict[str, dict], threshold: float,
             seeds: int) -> List[dict]:
    """Per method besides sft: its domain accuracy against the matched-domain bar (at the
    matched lr, or at its best-domain lr when it misses), and when it reaches the bar its
    general accuracy against SFT's there; each with margin, spread and seeds (module doc).
    ``within_noise`` is None with a single seed (no spread)."""
    def complete(rows):  # the rows with every seed, as for the bar; all when none has
        return _with_every_seed(rows, seeds) or rows

    sft_best = max(complete(sweep["sft"]), key=lambda r: r["domain"])
    sft_at = _row(sweep["sft"], methods["sft"])
    found = []
    for method, rows in sweep.items():
        if method == "sft":
            continue
        matched = _row(rows, methods[method])
        row = matched or max(complete(rows), key=lambda r: r["domain"])
        seeds = min(row["seeds"], sft_best["seeds"])
        found.append(_verdict(method, "reaches the matched domain" if matched else
                              "misses the matched domain", row, "domain", "bar", threshold,
                              MATCH_FRACTION * sft_best["domain_std"], seeds))
        if matched:
            found.append(_verdict(method, "general vs sft at matched domain", row, "general",
                                  "sft", sft_at["general"], sft_at["general_std"],
                                  min(row["seeds"], sft_at["seeds"])))
    return found


def _row(rows: Sequence[dict], matched: dict) -> Optional[dict]:
    """The sweep row of a matched point (None when the series has none)."""
    if matched["lr"] is None:
        return None
    return next(r for r in rows if (r["lr"], r["outer"]) == (matched["lr"], matched["outer"]))


def pareto_frontier(rows: Sequence[dict]) -> List[dict]:
    """The rows not dominated in (domain, general), sorted by domain."""
    front = [r for r in rows if not any(
        o["domain"] >= r["domain"] and o["general"] >= r["general"] and
        (o["domain"] > r["domain"] or o["general"] > r["general"]) for o in rows)]
    return sorted(front, key=lambda r: (r["domain"], -r["general"]))
