"""The lab's plots (matplotlib `Figure`, no pyplot state), formatted from the results dict (no statistics
computed here): effects (every metric per row with its interval), training curves (the trainer's per-step
log), teacher-forced learning curves (metrics at each checkpoint), the budget plot (each claim's effect
against the training budget), the prior profiles and the sweep."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from qtarget.lab.analysis import METRIC_BY_KEY, METRICS

CURVE_KEYS = ("loss", "nll", "p_y", "entropy")
TABLE_METRICS = ("gen_acc", "format_fail", "rank_acc", "rank_margin", "noise_fit", "forgetting", "entropy")


def plot_effects(results: dict[str, Any], path: Path) -> Path:
    """One panel per metric: each row's value with its 95 % interval."""
    metrics = [m for m in METRICS if any(m.key in e for e in results["estimates"].values())]
    cols = 4
    n_rows = (len(metrics) + cols - 1) // cols
    fig = Figure(figsize=(4.3 * cols, 0.35 * len(results["estimates"]) * n_rows + 1.6 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    names = list(results["estimates"])
    for ax, m in zip(axes.flat, metrics):
        ys, vals, los, his = [], [], [], []
        for i, row in enumerate(names):
            e = results["estimates"][row].get(m.key)
            if e:
                ys.append(i)
                vals.append(e["value"])
                los.append(e["value"] - e["lo"])
                his.append(e["hi"] - e["value"])
        ax.errorbar(vals, ys, xerr=[los, his], fmt="o", capsize=3)
        ref = results["estimates"].get(results["reference"], {}).get(m.key)
        if ref:
            ax.axvspan(ref["lo"], ref["hi"], color="tab:gray", alpha=0.2, lw=0)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(m.title + (f" ({m.better} is better)" if m.better else ""), fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"value and 95 % interval per row (gray band: {results['reference']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_curves(rows: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(4.2 * len(CURVE_KEYS), 3.4))
    axes = fig.subplots(1, len(CURVE_KEYS), squeeze=False)
    for ax, key in zip(axes[0], CURVE_KEYS):
        for name, row in rows.items():
            by_step: dict[int, list[float]] = {}
            for r in row["runs"]:
                for h in r.get("history") or []:
                    if isinstance(h.get(key), (int, float)):
                        by_step.setdefault(int(h["step"]), []).append(float(h[key]))
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=name, marker=".")
        ax.set_title({"loss": "training loss (objective's own scale)", "nll": "NLL of demonstrated tokens",
                      "p_y": "mean p_y", "entropy": "mean predictive entropy"}[key], fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_sweep(results: dict[str, Any], path: Path) -> Path:
    """Each metric against the first swept parameter (one line per value of a second one), with
    intervals; the reference row (sft) as a band."""
    sweep = results["settings"]["sweep"]
    objective, p1, values1 = sweep[0]
    second = sweep[1] if len(sweep) > 1 else None
    metrics = [m for m in METRICS if m.key in TABLE_METRICS]
    fig = Figure(figsize=(3.6 * len(metrics), 3.3))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    numeric = all(isinstance(v, (int, float)) for v in values1)
    xs = [float(v) for v in values1] if numeric else list(range(len(values1)))
    for ax, m in zip(axes[0], metrics):
        for v2 in (second[2] if second else [None]):
            pts = []
            for x, v1 in zip(xs, values1):
                row = next((r for r, d in results["rows"].items() if d.get("objective") == objective
                            and str(d["args"].get(p1)) == str(v1)
                            and (second is None or str(d["args"].get(second[1])) == str(v2))), None)
                e = results["estimates"].get(row, {}).get(m.key) if row else None
                if e:
                    pts.append((x, e["value"], e["value"] - e["lo"], e["hi"] - e["value"]))
            if pts:
                label = f"{second[1]}={v2}" if second else objective
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                            marker="o", capsize=3, label=label)
        ref = results["estimates"].get(results["reference"], {}).get(m.key)
        if ref:
            ax.axhspan(ref["lo"], ref["hi"], color="tab:gray", alpha=0.25, lw=0, label=results["reference"])
        if not numeric:
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in values1])
        ax.set_xlabel(f"{objective}.{p1}")
        ax.set_title(m.title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path




CURVE_METRICS = ("heldout_nll", "entropy", "noise_fit", "rank_margin")


def plot_learning_curves(entry: dict[str, Any], path: Path) -> Path:
    """One panel per teacher-forced metric: each trained row's value (with its interval) after every
    checkpoint; the base model's value as a gray band where it has one."""
    est = entry.get("curve_estimates") or {}
    fig = Figure(figsize=(4.2 * len(CURVE_METRICS), 3.5))
    axes = fig.subplots(1, len(CURVE_METRICS), squeeze=False)
    for ax, key in zip(axes[0], CURVE_METRICS):
        m = METRIC_BY_KEY[key]
        for row, by_step in est.items():
            pts = sorted((int(st), e[key]) for st, e in by_step.items() if key in e)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["value"] for p in pts],
                            yerr=[[p[1]["value"] - p[1]["lo"] for p in pts], [p[1]["hi"] - p[1]["value"] for p in pts]],
                            marker="o", ms=3, capsize=2, label=row)
        base = entry.get("estimates", {}).get("base", {}).get(key)
        if base:
            ax.axhspan(base["lo"], base["hi"], color="tab:gray", alpha=0.25, lw=0, label="base")
        ax.set_title(m.title + (f" ({m.better} is better)" if m.better else ""), fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"task {entry['data']['task']['name']}: teacher-forced metrics during training (95 % intervals)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_budget(entry: dict[str, Any], path: Path) -> Path:
    """One panel per claim on a teacher-forced metric: its effect and interval after each checkpoint,
    with the line the verdict is decided against (0, or −margin for ≥ / on-par claims)."""
    claims = entry.get("budget") or []
    cols = min(4, max(1, len(claims)))
    n_rows = max(1, (len(claims) + cols - 1) // cols)
    fig = Figure(figsize=(4.3 * cols, 3.0 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    colors = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray"}
    for ax, c in zip(axes.flat, claims):
        pts = c["points"]
        for p in pts:
            e = p["effect"]
            ax.errorbar([p["step"]], [e["value"]], yerr=[[e["value"] - e["lo"]], [e["hi"] - e["value"]]], marker="o",
                        capsize=3, color=colors[p["verdict"]])
        ax.plot([p["step"] for p in pts], [p["effect"]["value"] for p in pts], color="tab:blue", lw=0.8)
        ax.axhline(0.0, color="black", lw=0.6)
        if c["kind"] in ("at_least", "on_par") and c["margin"]:
            ax.axhline(-c["margin"], color="black", lw=0.6, ls="--")
            if c["kind"] == "on_par":
                ax.axhline(c["margin"], color="black", lw=0.6, ls="--")
        ax.set_title(("FLIPS: " if c["flips"] else "") + c["statement"], fontsize=8)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel(f"{c['row']} − {c['versus']}", fontsize=8)
    for ax in list(axes.flat)[len(claims):]:
        ax.axis("off")
    fig.suptitle(f"task {entry['data']['task']['name']}: each claim's effect against the training budget (green "
                 f"supported, red contradicted, gray inconclusive)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_prior(per_task: dict[str, Any], path: Path) -> Path:
    """Each task's prior profile: the histogram of the base model's p_y over its demonstration tokens."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    names = [n for n, e in per_task.items() if e.get("prior")]
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        prof = per_task[name]["prior"]
        counts = prof["histogram"]
        total = max(1, sum(counts))
        xs = [(i + 0.1 + width * (k + 0.5)) / len(counts) for i in range(len(counts))]
        ax.bar(xs, [c / total for c in counts], width=width / len(counts),
               label=f"{name}: median {prof['median']:.2f}, {prof['share_low']:.0%} below {prof['low']:g}")
    ax.set_xlabel("base model's p_y of a demonstration token")
    ax.set_ylabel("share of tokens")
    ax.set_title("prior profiles", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
