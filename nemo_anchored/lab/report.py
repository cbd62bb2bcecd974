"""The lab's report: results.md's Markdown tables (the matched-domain summary, every run, the
anchored runs after each outer iteration) and pareto.png."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from nemo_anchored.lab.summary import MATCH_FRACTION, pareto_frontier


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


def plot_pareto(path: Path, points: Sequence[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    colors = plt.get_cmap("tab10")
    for i, (method, rows) in enumerate(summary["sweep"].items()):
        color = colors(i % 10)
        runs = [p for p in points if p["method"] == method]
        ax.scatter([p["domain"] for p in runs], [p["general"] for p in runs], s=10,
                   alpha=0.35, color=color)
        ax.errorbar([r["domain"] for r in rows], [r["general"] for r in rows],
                    xerr=[r["domain_std"] for r in rows], yerr=[r["general_std"] for r in rows],
                    fmt="o", ms=5, color=color, capsize=2, lw=0.8)
        front = pareto_frontier(rows)
        ax.plot([r["domain"] for r in front], [r["general"] for r in front], "-", color=color,
                label=method)
    base = summary["methods"]["base"]
    ax.scatter([base["domain"]], [base["general"]], marker="*", s=200, color="black",
               label="base", zorder=5)
    ax.axvline(summary["matched_domain_threshold"], color="gray", ls=":", lw=1,
               label=f"matched domain ({MATCH_FRACTION:.0%} of best SFT)")
    ax.set_xlabel("domain accuracy (held-out, greedy exact match)")
    ax.set_ylabel("general accuracy (held-out, greedy exact match)")
    ax.set_title("trade-off per method over the lr sweep (points: runs; markers: seed mean ± std;"
                 "\nlines: each method's frontier)", fontsize=9)
    top = max([p["domain"] for p in points] + [base["domain"] or 0.0])
    ax.set_xlim(-0.02, min(1.02, top * 1.15 + 0.05))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
