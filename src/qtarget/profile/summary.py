"""A TokenProfile -> the numbers of profile.json: p_y quantiles and shares, entropy, top-1 agreement,
per-position buckets, the rows that look most off-prior and, with a teacher, where it disagrees."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qtarget.profile.compute import TokenProfile

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
LOW, HIGH = 0.1, 0.9  # share_p_y_below_0.1 / share_p_y_above_0.9
STRONG_TOKEN = 0.55  # arXiv 2510.00526 Table 6 reports the share of tokens above 0.55
# Buckets of a token's index among its row's supervised tokens: [start, end).
POSITION_BUCKETS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, 256), (256, None))
HIST_BINS = 20
TOP_ROWS = 5
TOKENS_SHOWN = 3  # least likely demonstrated tokens shown per off-prior row
TEACHER_CONFIDENT = 0.5  # "teacher supports the label, student does not": teacher p_y >= 0.5, student < LOW


def quantiles(values: np.ndarray) -> dict[str, float]:
    qs = np.quantile(values, QUANTILES)
    return {f"{q:g}": float(v) for q, v in zip(QUANTILES, qs)}


def _bucket_label(start: int, end: int | None) -> str:
    if end is None:
        return f"{start}+"
    return f"{start}" if end == start + 1 else f"{start}-{end - 1}"


def by_position(profile: TokenProfile) -> list[dict[str, Any]]:
    out = []
    for start, end in POSITION_BUCKETS:
        sel = (profile.position >= start) & (profile.position < (end if end is not None else np.inf))
        if not sel.any():
            continue
        entry = {"positions": _bucket_label(start, end), "tokens": int(sel.sum()),
                 "mean_p_y": float(profile.p_y[sel].mean()),
                 "share_p_y_below_0.1": float((profile.p_y[sel] < LOW).mean()),
                 "top1_agreement": float(profile.top1[sel].mean())}
        if profile.teacher:
            entry["teacher_student_agreement"] = float(profile.teacher["agree"][sel].mean())
        out.append(entry)
    return out


def _row_groups(profile: TokenProfile) -> tuple[np.ndarray, list[np.ndarray]]:
    rows = np.unique(profile.row)
    order = np.argsort(profile.row, kind="stable")
    bounds = np.searchsorted(profile.row[order], rows, side="left")
    ends = np.append(bounds[1:], order.size)
    return rows, [order[a:b] for a, b in zip(bounds, ends)]


def per_row(profile: TokenProfile, tokenizer=None, dataset_rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One entry per profiled row: tokens, mean p_y, mean NLL, share below 0.1, top-1 agreement and
    (with a tokenizer) its least likely demonstrated tokens. `row` indexes the profiled examples;
    `dataset_row` (when `dataset_rows` maps them) is the row's index in the user's dataset."""
    rows, groups = _row_groups(profile)
    out = []
    for r, idx in zip(rows, groups):
        entry: dict[str, Any] = {"row": int(r), "tokens": int(idx.size), "mean_p_y": float(profile.p_y[idx].mean()),
                                 "mean_nll": float(-profile.logp_y[idx].mean()),
                                 "share_p_y_below_0.1": float((profile.p_y[idx] < LOW).mean()),
                                 "top1_agreement": float(profile.top1[idx].mean())}
        if dataset_rows is not None:
            entry["dataset_row"] = int(dataset_rows[int(r)])
        if profile.teacher:
            entry["teacher_student_agreement"] = float(profile.teacher["agree"][idx].mean())
            entry["teacher_mean_p_y"] = float(profile.teacher["p_y"][idx].mean())
        if tokenizer is not None:
            low = idx[np.argsort(profile.p_y[idx], kind="stable")[:TOKENS_SHOWN]]
            entry["least_likely"] = [{"position": int(profile.position[i]), "p_y": float(profile.p_y[i]),
                                      "token": tokenizer.decode([int(profile.label[i])])} for i in low]
        out.append(entry)
    return out


def summarize(profile: TokenProfile, tokenizer=None, top_rows: int = TOP_ROWS,
              dataset_rows: Sequence[int] | None = None) -> dict[str, Any]:
    """The profile's summary (JSON-ready). `mean_p_y` is arXiv 2510.00526's Eq. 5 (mean predicted
    probability over all supervised tokens). `dataset_rows[i]`: the dataset row of profiled example i."""
    p = profile.p_y
    counts, edges = np.histogram(p, bins=HIST_BINS, range=(0.0, 1.0))
    rows = per_row(profile, tokenizer, dataset_rows)
    summary: dict[str, Any] = {
        "tokens": profile.tokens,
        "rows": len(rows),
        "mean_p_y": float(p.mean()),
        "mean_nll": float(-profile.logp_y.mean()),
        "p_y_quantiles": quantiles(p),
        "share_p_y_below_0.1": float((p < LOW).mean()),
        "share_p_y_above_0.9": float((p > HIGH).mean()),
        "share_p_y_above_0.55": float((p > STRONG_TOKEN).mean()),
        "mean_entropy": float(profile.entropy.mean()),
        "top1_agreement": float(profile.top1.mean()),
        "p_y_histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        "by_position": by_position(profile),
        "rows_most_off_prior": sorted(rows, key=lambda r: (-r["mean_nll"], r["row"]))[:top_rows],
        "row_mean_p_y_quantiles": quantiles(np.array([r["mean_p_y"] for r in rows])),
    }
    if profile.teacher:
        t = profile.teacher
        summary["teacher"] = {
            "mean_p_y": float(t["p_y"].mean()),
            "p_y_quantiles": quantiles(t["p_y"]),
            "mean_entropy": float(t["entropy"].mean()),
            "top1_agreement": float(t["top1"].mean()),
            "teacher_student_agreement": float(t["agree"].mean()),
            "mean_kl_teacher_student": float(t["kl"].mean()),
            "share_teacher_supports_student_not": float(((t["p_y"] >= TEACHER_CONFIDENT) & (p < LOW)).mean()),
            "share_teacher_above_student": float((t["p_y"] > p).mean()),
            "rows_most_disagreeing": sorted(rows, key=lambda r: (r["teacher_student_agreement"], r["row"]))[:top_rows],
        }
    return summary
