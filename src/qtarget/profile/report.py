"""The profile's outputs: a terminal table, profile.json and a PNG histogram of p_y."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from qtarget.profile.advice import BANDS, LAB, LAB_RUN, LAB_SCALE, Advice


def _q(qs: dict[str, float]) -> str:
    return "  ".join(f"q{float(k) * 100:g}={v:.3f}" for k, v in qs.items())


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _row_name(r: dict[str, Any]) -> str:
    return f"dataset row {r['dataset_row']}" if "dataset_row" in r else f"example {r['row']}"


def terminal_report(summary: dict[str, Any], advice: Advice | None = None, lab_cmd: str | None = None) -> str:
    s = summary
    lines = [f"prior profile: {s['tokens']} supervised tokens in {s['rows']} rows", "",
             "| measure | value |", "|---|---:|"]
    for label, key, fmt in (("mean p_y (arXiv 2510.00526 Eq. 5)", "mean_p_y", "{:.3f}"),
                            ("mean NLL", "mean_nll", "{:.3f}"),
                            ("share p_y < 0.1", "share_p_y_below_0.1", "{:.1%}"),
                            ("share p_y > 0.9", "share_p_y_above_0.9", "{:.1%}"),
                            ("share p_y > 0.55", "share_p_y_above_0.55", "{:.1%}"),
                            ("mean entropy (nats)", "mean_entropy", "{:.3f}"),
                            ("top-1 agreement with the demonstration", "top1_agreement", "{:.1%}")):
        lines.append(f"| {label} | {fmt.format(s[key])} |")
    lines.append(f"| p_y quantiles | {_q(s['p_y_quantiles'])} |")
    t = s.get("teacher")
    if t:
        lines += [f"| teacher mean p_y | {t['mean_p_y']:.3f} |",
                  f"| teacher top-1 agreement with the demonstration | {t['top1_agreement']:.1%} |",
                  f"| teacher–student top-1 agreement | {t['teacher_student_agreement']:.1%} |",
                  f"| mean KL(teacher ‖ student) | {t['mean_kl_teacher_student']:.3f} |",
                  f"| share teacher p_y ≥ 0.5 where student p_y < 0.1 | {t['share_teacher_supports_student_not']:.1%} |"]
    lines += ["", "by position among a row's supervised tokens:", "",
              "| positions | tokens | mean p_y | share < 0.1 | top-1 |" + (" teacher–student |" if t else ""),
              "|---|---:|---:|---:|---:|" + ("---:|" if t else "")]
    for b in s["by_position"]:
        row = (f"| {b['positions']} | {b['tokens']} | {b['mean_p_y']:.3f} | {b['share_p_y_below_0.1']:.1%} | "
               f"{b['top1_agreement']:.1%} |")
        if t:
            row += f" {b['teacher_student_agreement']:.1%} |"
        lines.append(row)
    lines += ["", "rows that look most off-prior (highest mean NLL; row = index in your dataset, from 0):", ""]
    for r in s["rows_most_off_prior"]:
        worst = ", ".join(f"{x['token']!r}@{x['position']} p={x['p_y']:.3g}" for x in r.get("least_likely", []))
        lines.append(f"  {_row_name(r)}: {r['tokens']} tokens, mean p_y {r['mean_p_y']:.3f}, NLL {r['mean_nll']:.2f}"
                     + (f"; least likely: {_short(worst, 90)}" if worst else ""))
    if t:
        lines += ["", "rows where teacher and student disagree most:", ""]
        for r in t["rows_most_disagreeing"]:
            lines.append(f"  {_row_name(r)}: top-1 agreement {r['teacher_student_agreement']:.1%}, student mean p_y "
                         f"{r['mean_p_y']:.3f}, teacher mean p_y {r['teacher_mean_p_y']:.3f}")
    if advice is not None:
        lines += ["", "what this profile implies (a prior to test, not a result):", "",
                  f"  {advice.placement.text}"]
        for src in advice.placement.sources:
            lines.append(f"    source: {src.text()}")
        lines += ["", f"objectives worth trying first ({advice.to_dict()['ranking']}):"]
        for i, r in enumerate(advice.recommendations, 1):
            f = r.finding
            lines.append(f"  {i}. {f.spec}: {f.reason}")
            for src in f.sources:
                lines.append(f"     - paper: {src.text()}")
            if r.lab:
                lines.append(f"     - lab at {LAB_SCALE} ({r.status})" + (f"; {f.lab_how}" if f.lab_how else "") + ":")
                lines += [f"         {e.text()}" for e in r.lab]
            else:
                lines.append(f"     - lab at {LAB_SCALE}: not measured")
            lines += [f"     - your lab: {y}" for y in r.yours]
            if r.ranked:
                lines.append(f"     - {r.ranked}")
        lines.append(f"  (lab evidence: {LAB}, {LAB_RUN})")
        if advice.your_lab:
            lines += ["", "which objective won in your own lab run:"] + [f"  - {y}" for y in advice.your_lab]
        if advice.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in advice.notes]
        lines += ["", advice.to_dict()["caveat"]]
    if lab_cmd:
        lines += ["", "test it on your model and data:", f"  {lab_cmd}"]
    return "\n".join(lines)


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Atomic write (a partial file never replaces a complete one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def plot_histogram(summary: dict[str, Any], path: Path, title: str = "") -> Path:
    """Histogram of p_y over supervised tokens (and the teacher's quantiles when present)."""
    hist = summary["p_y_histogram"]
    edges, counts = hist["edges"], hist["counts"]
    total = max(1, sum(counts))
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], [c / total for c in counts], width=widths, align="edge", color="#4878d0", edgecolor="white")
    ax.axvline(summary["mean_p_y"], color="black", linestyle="--", label=f"mean p_y = {summary['mean_p_y']:.3f}")
    for band, color in zip(BANDS, ("#d65f5f", "#ee854a", "#6acc64")):
        ax.axvspan(band.lo, band.hi, alpha=0.15, color=color,
                   label=f"2510.00526 {band.source.where}: {band.regime} band (mean p_y)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("p_y (model probability of the demonstrated token)")
    ax.set_ylabel("share of supervised tokens")
    ax.set_title(title or f"prior profile: {summary['tokens']} tokens, {summary['rows']} rows")
    ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path
