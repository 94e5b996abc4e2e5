"""Evaluation metrics over per-sample records.

A *record* is a dict with at least: "benchmark", "problem_id", "sample_idx", "correct" (bool),
"num_tokens" (int), "cut" (bool, hit the token limit), "entropy" (float or None, mean token entropy).

- accuracy / avg@n: mean correctness over all samples (per problem first, then over problems; the same
  when every problem has n samples).
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), per problem, averaged.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["pass_at_k", "default_ks", "summarize", "summarize_benchmark"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples of which `c` are correct.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which equals 1 - C(n-c, k)/C(n, k) without
    forming large binomials.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError("pass_at_k: n, c and k must be integers")
    if n < 1 or k < 1:
        raise ValueError(f"pass_at_k: need n >= 1 and k >= 1, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than the number of samples n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n not in ks:
        ks.append(n)
    return ks


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize_benchmark(records: Iterable[dict[str, Any]], ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Metrics for one benchmark's records (see module docstring for the fields)."""
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rows = list(records)
    for r in rows:
        by_problem[r["problem_id"]].append(r)
    if not by_problem:
        return {"problems": 0, "samples": 0}
    counts = [len(v) for v in by_problem.values()]
    n_min = min(counts)
    ks = list(ks) if ks is not None else default_ks(n_min)
    per_problem_acc = [sum(bool(r["correct"]) for r in v) / len(v) for v in by_problem.values()]
    out: dict[str, Any] = {
        "problems": len(by_problem),
        "samples": len(rows),
        "samples_per_problem": n_min if n_min == max(counts) else [n_min, max(counts)],
        "accuracy": _mean(per_problem_acc),
        f"avg@{n_min}": _mean(per_problem_acc),
    }
    for k in ks:
        if k > n_min:
            continue
        out[f"pass@{k}"] = _mean([
            pass_at_k(len(v), sum(bool(r["correct"]) for r in v), k) for v in by_problem.values()
        ])
    out["mean_response_tokens"] = _mean([float(r["num_tokens"]) for r in rows])
    out["cut_rate"] = _mean([float(bool(r["cut"])) for r in rows])
    ents = [float(r["entropy"]) for r in rows if r.get("entropy") is not None and not math.isnan(r["entropy"])]
    out["mean_token_entropy"] = _mean(ents)
    return out


def summarize(records: Iterable[dict[str, Any]], ks: Sequence[int] | None = None) -> dict[str, Any]:
    """{"benchmarks": {name: metrics}, "overall": metrics over all records}."""
    rows = list(records)
    by_bench: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_bench[r["benchmark"]].append(r)
    return {
        "benchmarks": {b: summarize_benchmark(v, ks) for b, v in sorted(by_bench.items())},
        "overall": summarize_benchmark(rows, ks),
    }


def markdown_table(summary: dict[str, Any]) -> str:
    """A markdown table: one row per benchmark (and 'overall'), metrics as columns (percentages for rates)."""
    rows = [*summary["benchmarks"].items(), ("overall", summary["overall"])]
    keys: list[str] = []
    for _, m in rows:
        for k in m:
            if k not in keys and k not in ("samples_per_problem",):
                keys.append(k)

    def fmt(k: str, v: Any) -> str:
        if v is None:
            return "-"
        if k in ("accuracy", "cut_rate") or k.startswith(("pass@", "avg@")):
            return f"{100 * v:.1f}"
        if isinstance(v, float):
            return f"{v:.3f}" if k == "mean_token_entropy" else f"{v:.1f}"
        return str(v)

    header = "| benchmark | " + " | ".join(
        k + (" (%)" if k in ("accuracy", "cut_rate") or k.startswith(("pass@", "avg@")) else "") for k in keys
    ) + " |"
    sep = "|" + "---|" * (len(keys) + 1)
    lines = [header, sep]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(k, m.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"
