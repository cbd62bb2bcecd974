"""The lab's report: results.json, results.md's Markdown tables (the matched-domain summary, every
run, how close each verdict is, the anchored runs after each outer iteration, the authors arm's
SFT references) and pareto.png / .pdf."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from nemo_anchored.atomic import write_text
from nemo_anchored.lab.settings import LAB_METHODS
from nemo_anchored.lab.summary import MATCH_FRACTION, SPREAD, pareto_frontier, summarize


def write_report(out: Path, points: List[dict], details: List[dict], references: List[dict],
                 base: dict, failed_runs: List[dict], config: dict,
                 log: Callable[[str], None]) -> dict:
    """Summarize the points (lab/summary.py), write OUT/results.json, pareto.png / .pdf and
    results.md, print the tables; returns the results."""
    summary = summarize(points, base)
    results = {
        "points": points,
        "methods": summary["methods"],
        "sweep": summary["sweep"],
        "matched_domain_threshold": summary["matched_domain_threshold"],
        "best_sft_domain": summary["best_sft_domain"],
        "verdicts": summary["verdicts"],
        "base": base,
        "failed_runs": failed_runs,
        "point_details": details,
        "references": references,
        "config": config,
    }
    plot_pareto(out / "pareto.png", points, summary, references)
    table = "\n\n".join(part for part in (
        markdown_table(summary), verdict_lines(summary), anchored_trace_table(details),
        reference_table(references), failed_table(failed_runs)) if part)
    write_text(out / "results.md", table + "\n")
    # Last: a results.json says the lab (or merge) finished, its report beside it.
    write_text(out / "results.json", json.dumps(results, indent=1))
    log("")
    log(table)
    return results


def _fmt(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _outer(row: dict) -> str:
    return "-" if row.get("outer") is None else f"{row['outer']}/{row['outers']}"


def _compute(row: dict) -> str:
    return "-" if row.get("compute") is None else f"{row['compute']:.3g}"


COMPUTE_UNIT = ("compute: forward-equivalent token passes (forward + 2 x backward, frozen "
                "models' forwards and the SFT reference included; lab/budget.py)")


def markdown_table(summary: dict) -> str:
    lines = [f"Matched domain accuracy: >= {MATCH_FRACTION:.0%} of the best SFT domain accuracy "
             f"({summary['best_sft_domain']:.3f}) = {summary['matched_domain_threshold']:.3f}. "
             f"outer: the anchored checkpoint (outer iteration t of T); {COMPUTE_UNIT}",
             "", "| method | lr | outer | domain | general | compute | note |",
             "|---|---|---|---|---|---|---|"]
    if summary["best_sft_domain"] == 0:
        lines.insert(1, "WARNING: SFT never learned the domain (best 0.000): every run "
                        "qualifies and the matched-domain comparison says nothing")
    for method, m in summary["methods"].items():
        lr = "-" if m.get("lr") is None else f"{m['lr']:g}"
        lines.append(f"| {method} | {lr} | {_outer(m)} | {_fmt(m['domain'], m['domain_std'])} | "
                     f"{_fmt(m['general'], m['general_std'])} | {_compute(m)} | "
                     f"{m.get('note', '')} |")
    lines += ["", "All runs (seed mean ± std):", "",
              "| method | lr | outer | domain | general | compute | seeds |",
              "|---|---|---|---|---|---|---|"]
    for method, rows in summary["sweep"].items():
        for r in rows:
            lines.append(f"| {method} | {r['lr']:g} | {_outer(r)} | "
                         f"{_fmt(r['domain'], r['domain_std'])} | "
                         f"{_fmt(r['general'], r['general_std'])} | {_compute(r)} | "
                         f"{r['seeds']} |")
    return "\n".join(lines)


def verdict_lines(summary: dict) -> str:
    """How close each verdict is (summary.verdicts): margin against the seed spread."""
    rows = summary["verdicts"]
    if not rows:
        return ""
    seeds = sorted({v["seeds"] for v in rows})
    lines = [f"How close each verdict is ({SPREAD}; "
             f"{' or '.join(map(str, seeds))} seed(s)):", "",
             "| method | verdict | lr | outer | value | against | margin | spread | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in rows:
        closeness = ("1 seed: no spread" if v["within_noise"] is None
                     else "within noise" if v["within_noise"] else "beyond the spread")
        lines.append(f"| {v['method']} | {v['verdict']} | {v['lr']:g} | {_outer(v)} | "
                     f"{_fmt(v['value'], v['value_std'])} | "
                     f"{v['against_name']} {_fmt(v['against'], v['against_std'])} | "
                     f"{v['margin']:+.3f} | {v['spread']:.3f} | {closeness} |")
    return "\n".join(lines)


def anchored_trace_table(details: Sequence[dict]) -> str:
    """Per anchored series and lr (seed means): domain, general and KL to p_base after each
    outer iteration, with the equal arm's sft final point at the same lr for comparison."""
    groups: Dict[tuple, List[dict]] = {}
    for d in details:
        if "trace" in d:
            groups.setdefault((d.get("series", d["method"]), d["lr"]), []).append(d)
    if not groups:
        return ""
    sft = {}
    for d in details:
        if d.get("series", d["method"]) == "sft":  # the equal arm's
            sft.setdefault(d["lr"], []).append(d)
    lines = ["Anchored runs after each outer iteration (seed means; KL: per response token of "
             "the general held-out set, KL(p_theta || p_base)):", "",
             "| method | lr | outer | domain | general | KL to base |", "|---|---|---|---|---|---|"]
    for (method, lr), runs in sorted(groups.items()):
        for i in range(min(len(r["trace"]) for r in runs)):
            at = [r["trace"][i] for r in runs]
            lines.append(f"| {method} | {lr:g} | {i + 1} | "
                         f"{statistics.fmean(t['domain'] for t in at):.3f} | "
                         f"{statistics.fmean(t['general'] for t in at):.3f} | "
                         f"{statistics.fmean(t['kl_to_base_general'] for t in at):.3f} |")
        if lr in sft:
            ref = sft[lr]
            lines.append(f"| sft (final) | {lr:g} | - | "
                         f"{statistics.fmean(r['domain'] for r in ref):.3f} | "
                         f"{statistics.fmean(r['general'] for r in ref):.3f} | "
                         f"{statistics.fmean(r['kl_to_base_general'] for r in ref):.3f} |")
    return "\n".join(lines)


def failed_table(failed_runs: Sequence[dict]) -> str:
    """The trainings that failed (diverged, collapsed), whose points are missing from every
    table above: a method with all its runs here is not in the summary at all."""
    if not failed_runs:
        return ""
    return "\n".join(["Failed trainings (no point; summary.py leaves out a point with any):", "",
                      "| training | error |", "|---|---|",
                      *(f"| {f['run']} | {f['error']} |" for f in failed_runs)])


def reference_table(references: Sequence[dict]) -> str:
    """The SFT references that are no sweep points (the authors arm's, with epochs of their own),
    seed mean ± std per epochs: an anchored run toward one learns no more than it has."""
    if not references:
        return ""
    lines = ["SFT references of the authors arm (the anchored runs' targets; seed mean ± std):", "",
             "| epochs | lr | domain | general | KL to base | compute | seeds |",
             "|---|---|---|---|---|---|---|"]
    for epochs, rows in _reference_groups(references).items():
        stat = {key: _fmt(*_mean_std([r[key] for r in rows]))
                for key in ("domain", "general", "kl_to_base_general")}
        lines.append(f"| {epochs} | {rows[0]['lr']:g} | {stat['domain']} | {stat['general']} | "
                     f"{stat['kl_to_base_general']} | "
                     f"{rows[0]['compute_passes']['forward_equivalent']:.3g} | {len(rows)} |")
    return "\n".join(lines)


def _reference_groups(references: Sequence[dict]) -> Dict[int, List[dict]]:
    """The references by their epochs, in increasing order (one row per seed in each)."""
    groups: Dict[int, List[dict]] = {}
    for r in sorted(references, key=lambda r: r["epochs"]):
        groups.setdefault(r["epochs"], []).append(r)
    return groups


def _mean_std(values: Sequence[float]):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


# Okabe & Ito's colour-blind-safe palette, one colour and one marker per lab method, so that a
# method is told apart in grey print and by readers with any common colour-vision deficiency.
_STYLES = dict(zip(LAB_METHODS, zip(
    ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"),
    ("o", "s", "^", "D", "v", "P", "X", "h"))))


def _clipped_std(means: Sequence[float], stds: Sequence[float]) -> List[List[float]]:
    """Error bars of +- one std that stop at 0 and 1 (accuracies cannot leave [0, 1])."""
    return [[min(s, m) for m, s in zip(means, stds)],
            [min(s, 1.0 - m) for m, s in zip(means, stds)]]


_ARM_LINES = {"equal": "-", "authors": "--", "control": ":"}


def _series_styles(points: Sequence[dict]) -> Dict[str, dict]:
    """Per series: its method's colour and marker, its arm's line style, and (in an alpha
    sweep) a line width and opacity that grow with alpha."""
    alphas = sorted({p["alpha"] for p in points if p.get("alpha") is not None})
    styles = {}
    for p in points:
        series = p.get("series", p["method"])
        if series in styles:
            continue
        color, marker = _STYLES[p["method"]]
        rank = alphas.index(p["alpha"]) if p.get("alpha") is not None else len(alphas) - 1
        weight = 1.0 if len(alphas) < 2 else 0.45 + 0.55 * rank / (len(alphas) - 1)
        styles[series] = {"color": color, "marker": marker, "lw": 0.8 + 1.2 * weight,
                          "alpha": weight, "ls": _ARM_LINES[p.get("arm", "equal")]}
    return styles


def _final(row: dict) -> bool:
    return row.get("outer") is None or row["outer"] == row["outers"]


def plot_pareto(path: Path, points: Sequence[dict], summary: dict,
                references: Sequence[dict] = ()) -> None:
    """``path`` (PNG) and the same figure as PDF next to it. Left: the trade-off per series
    over its sweep: seed means (final checkpoints labelled with their lr), error bars, each
    seed's run faint, each series' frontier; the authors arm's SFT references (``references``,
    the anchored runs' targets) as grey crosses labelled with their epochs. Right: general
    accuracy at matched domain accuracy against compute: every sweep point that reaches the
    bar faint, each series' matched point with its error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seeds"] for rows in summary["sweep"].values() for r in rows})
    styles = _series_styles(points)
    threshold = summary["matched_domain_threshold"]
    with plt.rc_context({"font.size": 11, "axes.labelsize": 12, "legend.fontsize": 9,
                         "pdf.fonttype": 42}):
        fig, (ax, cx) = plt.subplots(1, 2, figsize=(17, 6.6),
                                     gridspec_kw={"width_ratios": [1.25, 1]})
        missing = []
        for series, rows in summary["sweep"].items():
            st = styles[series]
            runs = [p for p in points if p.get("series", p["method"]) == series]
            ax.scatter([p["domain"] for p in runs], [p["general"] for p in runs], s=14,
                       marker=st["marker"], facecolors="none", edgecolors=st["color"],
                       alpha=0.4 * st["alpha"], lw=0.8)
            domain, general = [r["domain"] for r in rows], [r["general"] for r in rows]
            ax.errorbar(domain, general,
                        xerr=_clipped_std(domain, [r["domain_std"] for r in rows]),
                        yerr=_clipped_std(general, [r["general_std"] for r in rows]),
                        fmt=st["marker"], ms=6, color=st["color"], mec="black", mew=0.5,
                        capsize=2, lw=0.8, alpha=st["alpha"], zorder=3)
            for r in filter(_final, rows):
                ax.annotate(f"{r['lr']:.0e}".replace("e-0", "e-"), (r["domain"], r["general"]),
                            xytext=(5, 4), textcoords="offset points", fontsize=7.5,
                            color="0.3")
            front = pareto_frontier(rows)
            ax.plot([r["domain"] for r in front], [r["general"] for r in front], st["ls"],
                    color=st["color"], lw=st["lw"], marker=st["marker"], ms=6, mec="black",
                    mew=0.5, alpha=st["alpha"], label=series)
            reach = [r for r in rows if r["domain"] >= threshold - 1e-12 and
                     r.get("compute") is not None]
            matched = summary["methods"][series]
            if matched.get("compute") is None:
                missing.append(series)
                continue
            cx.scatter([r["compute"] for r in reach], [r["general"] for r in reach], s=14,
                       marker=st["marker"], facecolors="none", edgecolors=st["color"],
                       alpha=0.5, lw=0.8)
            cx.errorbar([matched["compute"]], [matched["general"]],
                        yerr=_clipped_std([matched["general"]], [matched["general_std"]]),
                        fmt=st["marker"], ms=8, color=st["color"], mec="black", mew=0.6,
                        capsize=2.5, lw=1.0, zorder=3, label=series)
        for i, (epochs, rows) in enumerate(_reference_groups(references).items()):
            (domain, domain_std), (general, general_std) = (
                _mean_std([r[key] for r in rows]) for key in ("domain", "general"))
            ax.errorbar([domain], [general], xerr=_clipped_std([domain], [domain_std or 0.0]),
                        yerr=_clipped_std([general], [general_std or 0.0]), fmt="x", ms=9, mew=2,
                        color="0.35", capsize=2, lw=0.8, zorder=4,
                        label="SFT reference of the authors arm" if i == 0 else None)
            ax.annotate(f"ref. {epochs} ep", (domain, general), xytext=(6, -11),
                        textcoords="offset points", fontsize=8, color="0.25")
        base = summary["methods"]["base"]
        ax.scatter([base["domain"]], [base["general"]], marker="*", s=260, color="black",
                   label="base", zorder=5)
        ax.axvline(threshold, color="0.4", ls=":", lw=1.2,
                   label=f"matched domain ({MATCH_FRACTION:.0%} of best SFT)")
        ax.set_xlabel("domain accuracy (held-out, greedy exact match)")
        ax.set_ylabel("general accuracy (held-out, greedy exact match)")
        ax.set_title("Domain gain against general skills, per method over its sweep")
        top = max([p["domain"] for p in points] + [base["domain"] or 0.0])
        ax.set_xlim(-0.02, min(1.02, top * 1.15 + 0.05))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        # Under the axes, not beside them: the legend there grows with the series (30 in the
        # full lab) and would run over it.
        ax.text(0.0, -0.13, "Large markers: seed means (final checkpoints labelled with their "
                f"lr). Error bars: \u00b11 sample std over {' or '.join(map(str, seeds))} "
                f"seed{'s' if seeds[-1] > 1 else ''}, "
                "clipped to [0, 1].\nHollow: single runs. Lines: frontiers; solid equal, dashed "
                "authors, dotted control arm.", transform=ax.transAxes, va="top", fontsize=8.5)
        sft = summary["methods"]["sft"]
        if sft.get("general") is not None:
            cx.axhline(sft["general"], color="0.4", ls="--", lw=1.0,
                       label="sft at matched domain")
        cx.set_xscale("log")
        cx.margins(x=0.12)
        cx.set_xlabel("compute (forward-equivalent token passes, reference included)")
        cx.set_ylabel("general accuracy at matched domain accuracy")
        cx.set_title("At matched domain accuracy, against compute")
        cx.set_ylim(-0.02, 1.02)
        cx.grid(alpha=0.3, which="both")
        cx.legend(loc="upper right", fontsize=8)
        if missing:
            cx.text(0.02, 0.98, "never reach the matched domain:\n" + "\n".join(missing),
                    transform=cx.transAxes, va="top", fontsize=7.5, color="0.3")
        fig.tight_layout()
        fig.savefig(path, dpi=170, bbox_inches="tight")
        fig.savefig(Path(path).with_suffix(".pdf"), bbox_inches="tight")
        plt.close(fig)
