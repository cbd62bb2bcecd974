"""The lab's report: results.md's Markdown tables (the matched-domain summary, every run, how
close each verdict is, the anchored runs after each outer iteration) and pareto.png / .pdf."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from nemo_anchored.lab.settings import LAB_METHODS
from nemo_anchored.lab.summary import MATCH_FRACTION, SPREAD, pareto_frontier


def _fmt(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def markdown_table(summary: dict) -> str:
    lines = [f"Matched domain accuracy: >= {MATCH_FRACTION:.0%} of the best SFT domain accuracy "
             f"({summary['best_sft_domain']:.3f}) = {summary['matched_domain_threshold']:.3f}",
             "", "| method | lr | domain | general | note |", "|---|---|---|---|---|"]
    if summary["best_sft_domain"] == 0:
        lines.insert(1, "WARNING: SFT never learned the domain (best 0.000): every run "
                        "qualifies and the matched-domain comparison says nothing")
    for method, m in summary["methods"].items():
        lr = "-" if m.get("lr") is None else f"{m['lr']:g}"
        lines.append(f"| {method} | {lr} | {_fmt(m['domain'], m['domain_std'])} | "
                     f"{_fmt(m['general'], m['general_std'])} | {m.get('note', '')} |")
    lines += ["", "All runs (seed mean ± std):", "",
              "| method | lr | domain | general | seeds |", "|---|---|---|---|---|"]
    for method, rows in summary["sweep"].items():
        for r in rows:
            lines.append(f"| {method} | {r['lr']:g} | {_fmt(r['domain'], r['domain_std'])} | "
                         f"{_fmt(r['general'], r['general_std'])} | {r['seeds']} |")
    return "\n".join(lines)


def verdict_lines(summary: dict) -> str:
    """How close each verdict is (summary.verdicts): margin against the seed spread."""
    rows = summary["verdicts"]
    if not rows:
        return ""
    seeds = sorted({v["seeds"] for v in rows})
    lines = [f"How close each verdict is ({SPREAD}; "
             f"{' or '.join(map(str, seeds))} seed(s)):", "",
             "| method | verdict | lr | value | against | margin | spread | |",
             "|---|---|---|---|---|---|---|---|"]
    for v in rows:
        closeness = ("1 seed: no spread" if v["within_noise"] is None
                     else "within noise" if v["within_noise"] else "beyond the spread")
        lines.append(f"| {v['method']} | {v['verdict']} | {v['lr']:g} | "
                     f"{_fmt(v['value'], v['value_std'])} | "
                     f"{v['against_name']} {_fmt(v['against'], v['against_std'])} | "
                     f"{v['margin']:+.3f} | {v['spread']:.3f} | {closeness} |")
    return "\n".join(lines)


def anchored_trace_table(details: Sequence[dict]) -> str:
    """Per anchored method and lr (seed means): domain, general and KL to p_base after each
    outer iteration, with sft's final point at the same lr for comparison."""
    groups: Dict[tuple, List[dict]] = {}
    for d in details:
        if "trace" in d:
            groups.setdefault((d["method"], d["lr"]), []).append(d)
    if not groups:
        return ""
    sft = {}
    for d in details:
        if d["method"] == "sft":
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


# Okabe & Ito's colour-blind-safe palette, one colour and one marker per lab method, so that a
# method is told apart in grey print and by readers with any common colour-vision deficiency.
_STYLES = dict(zip(LAB_METHODS, zip(
    ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"),
    ("o", "s", "^", "D", "v", "P", "X", "h"))))


def _clipped_std(means: Sequence[float], stds: Sequence[float]) -> List[List[float]]:
    """Error bars of +- one std that stop at 0 and 1 (accuracies cannot leave [0, 1])."""
    return [[min(s, m) for m, s in zip(means, stds)],
            [min(s, 1.0 - m) for m, s in zip(means, stds)]]


def plot_pareto(path: Path, points: Sequence[dict], summary: dict) -> None:
    """The trade-off per method over its lr sweep, as ``path`` (PNG) and the same figure as
    PDF next to it: seed means with their lr written beside them, error bars, each seed's run
    faint, each method's frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seeds"] for rows in summary["sweep"].values() for r in rows})
    with plt.rc_context({"font.size": 11, "axes.labelsize": 12, "legend.fontsize": 10,
                         "pdf.fonttype": 42}):
        fig, ax = plt.subplots(figsize=(10, 6.2))
        for method, rows in summary["sweep"].items():
            color, marker = _STYLES[method]
            runs = [p for p in points if p["method"] == method]
            ax.scatter([p["domain"] for p in runs], [p["general"] for p in runs], s=16,
                       marker=marker, facecolors="none", edgecolors=color, alpha=0.5, lw=0.8)
            domain, general = [r["domain"] for r in rows], [r["general"] for r in rows]
            ax.errorbar(domain, general,
                        xerr=_clipped_std(domain, [r["domain_std"] for r in rows]),
                        yerr=_clipped_std(general, [r["general_std"] for r in rows]),
                        fmt=marker, ms=7, color=color, mec="black", mew=0.6, capsize=2.5,
                        lw=1.0, zorder=3)
            for r in rows:
                ax.annotate(f"{r['lr']:.0e}".replace("e-0", "e-"), (r["domain"], r["general"]),
                            xytext=(5, 4),
                            textcoords="offset points", fontsize=8.5, color="0.25")
            front = pareto_frontier(rows)
            ax.plot([r["domain"] for r in front], [r["general"] for r in front], "-",
                    color=color, lw=1.6, marker=marker, ms=7, mec="black", mew=0.6,
                    label=method)
        base = summary["methods"]["base"]
        ax.scatter([base["domain"]], [base["general"]], marker="*", s=260, color="black",
                   label="base", zorder=5)
        ax.axvline(summary["matched_domain_threshold"], color="0.4", ls=":", lw=1.2,
                   label=f"matched domain ({MATCH_FRACTION:.0%} of best SFT)")
        ax.set_xlabel("domain accuracy (held-out, greedy exact match)")
        ax.set_ylabel("general accuracy (held-out, greedy exact match)")
        ax.set_title("Domain gain against general skills, per method over its lr sweep")
        ax.text(1.02, 0.0, f"Large markers: seed means,\nlabelled with their lr.\nError bars: "
                f"\u00b11 sample std\nover {' or '.join(map(str, seeds))} seeds, clipped to "
                "[0, 1].\nSmall hollow markers:\nsingle runs.\nLines: each method's\nfrontier.",
                transform=ax.transAxes, va="bottom", fontsize=10)
        top = max([p["domain"] for p in points] + [base["domain"] or 0.0])
        ax.set_xlim(-0.02, min(1.02, top * 1.15 + 0.05))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.savefig(path, dpi=200, bbox_inches="tight")
        fig.savefig(Path(path).with_suffix(".pdf"), bbox_inches="tight")
        plt.close(fig)
