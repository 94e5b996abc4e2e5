"""From per-item values to estimates: each metric's value per row, each row's difference from SFT, and
the claims table. Every interval comes from `qtarget.lab.stats`; nothing here formats.

Per-item values (`items[row][key]`, arrays [S, N], one row per training seed; the base row has S = 1
and is broadcast against trained rows):
    gen.correct, gen.no_answer      generation: right answer / no "The answer is N" (format failure)
    rank.correct                    answer ranking: the correct demonstration scores highest
    rank.entropy, rank.nll          held-out in-domain tokens (the correct demonstrations)
    ood.nll                         out-of-domain paragraphs
    noise.corrupt, noise.clean,     training demonstrations: log-prob gain (trained - base) on the
    noise.alternative               corrupted tokens / the matching correct tokens of clean demonstrations /
                                    alternative-form tokens
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qtarget.lab import stats


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    decimals: int
    better: str          # "higher", "lower" or "" (no preferred direction)
    meaning: str


METRICS: tuple[Metric, ...] = (
    Metric("gen_acc", "in-domain accuracy (generation)", 3, "higher",
           "greedy answers to held-out problems whose stated final answer is right"),
    Metric("format_fail", "format failures", 3, "lower",
           "share of greedy answers that never state 'The answer is N' (counted apart from wrong answers)"),
    Metric("rank_acc", "answer ranking accuracy", 3, "higher",
           "held-out problems where the correct demonstration has a higher total log-prob than every "
           "corrupted one"),
    Metric("noise_fit", "noise fit", 3, "lower",
           "training set: mean log-prob gain (trained − base) on the tokens a corruption changed (wrong result "
           "digits), minus the gain on the matching correct tokens of clean demonstrations (the digits a "
           "corruption would have changed); > 0: wrong results were learned more than right ones"),
    Metric("forgetting", "forgetting (ΔNLL OOD)", 3, "lower",
           "NLL per token on out-of-domain paragraphs, trained − base (> 0: forgot)"),
    Metric("entropy", "held-out entropy", 3, "",
           "mean predictive entropy (nats) on held-out demonstration tokens; a drop toward 0 is collapse"),
    Metric("heldout_nll", "held-out NLL", 3, "lower", "NLL per token of held-out correct demonstrations"),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
ITEM_KEY = {"gen_acc": "gen.correct", "format_fail": "gen.no_answer", "rank_acc": "rank.correct",
            "entropy": "rank.entropy", "heldout_nll": "rank.nll"}


def _broadcast(a: np.ndarray, seeds: int) -> np.ndarray:
    return np.repeat(a, seeds, axis=0) if a.shape[0] == 1 and seeds > 1 else a


def metric_groups(items: dict[str, dict[str, np.ndarray]], metric: str, row: str, versus: str | None = None
                  ) -> list[np.ndarray] | None:
    """The per-item arrays behind `metric` of `row` (minus `versus`, paired, when given); None when the
    row lacks them (e.g. noise fit of the untrained base). One array, or two for noise fit
    (corrupted, clean: the statistic is their difference of means)."""
    def get(r: str, key: str) -> np.ndarray | None:
        v = items.get(r, {}).get(key)
        return None if v is None else np.asarray(v, dtype=np.float64)

    def one(r: str) -> list[np.ndarray] | None:
        if metric in ITEM_KEY:
            v = get(r, ITEM_KEY[metric])
            return None if v is None else [v]
        if metric == "forgetting":
            v, b = get(r, "ood.nll"), get("base", "ood.nll")
            if v is None or b is None or r == "base":
                return None
            return [v - _broadcast(b, v.shape[0])]
        if metric == "noise_fit":
            c, k = get(r, "noise.corrupt"), get(r, "noise.clean")
            return None if c is None or k is None or c.shape[1] == 0 else [c, k]
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRIC_BY_KEY)}")

    a = one(row)
    if versus is None or a is None:
        return a
    b = one(versus)
    if b is None:
        return None
    seeds = max(a[0].shape[0], b[0].shape[0])
    return [_broadcast(x, seeds) - _broadcast(y, seeds) for x, y in zip(a, b)]


def estimate(items, metric: str, row: str, versus: str | None = None, *, n_boot: int, seed: int
             ) -> stats.Estimate | None:
    groups = metric_groups(items, metric, row, versus)
    if groups is None:
        return None
    if len(groups) == 1:
        return stats.mean_interval(groups[0], n_boot=n_boot, seed=seed)
    return stats.group_difference(groups[0], groups[1], n_boot=n_boot, seed=seed)


def summarize(items, *, reference: str = "sft", n_boot: int, seed: int) -> dict[str, Any]:
    """{"estimates": {row: {metric: Estimate dict}}, "vs_reference": {row: {metric: Estimate dict}}}:
    each row's value and its paired difference from `reference` (rows other than the reference)."""
    est: dict[str, dict] = {}
    diff: dict[str, dict] = {}
    for row in items:
        est[row], diff[row] = {}, {}
        for m in METRICS:
            e = estimate(items, m.key, row, n_boot=n_boot, seed=seed)
            if e is not None:
                est[row][m.key] = e.to_dict()
            if reference in items and row not in (reference, "base"):
                d = estimate(items, m.key, row, reference, n_boot=n_boot, seed=seed)
                if d is not None:
                    diff[row][m.key] = d.to_dict()
    return {"estimates": est, "vs_reference": diff, "reference": reference}


# -------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Claim:
    """`row` vs `versus` on `metric`: the effect metric(row) − metric(versus), paired over items, is
    expected to be `kind` (see `stats.verdict`), with `margin` for at_least / on_par."""

    source: str
    statement: str
    metric: str
    row: str
    versus: str
    kind: str
    margin: float = 0.0


CLAIMS: tuple[Claim, ...] = (
    Claim("DFT (2508.05629)", "DFT beats SFT in-domain", "gen_acc", "dft", "sft", "greater"),
    Claim("DFT (2508.05629)", "DFT beats SFT in-domain (answer ranking)", "rank_acc", "dft", "sft", "greater"),
    Claim("seeds: γ = p_y", "DFT's γ = p_y fits corrupted tokens less than SFT", "noise_fit", "dft", "sft", "less"),
    Claim("seeds: γ = p_y", "Target-SFT's γ = p_y fits corrupted tokens less than SFT", "noise_fit", "target_sft",
          "sft", "less"),
    Claim("PSFT (2508.17784)", "PSFT avoids entropy collapse: more held-out entropy than SFT", "entropy", "psft",
          "sft", "greater"),
    Claim("PSFT (2508.17784)", "PSFT forgets less than SFT", "forgetting", "psft", "sft", "less"),
    Claim("PSFT (2508.17784)", "PSFT is on par with SFT in-domain (±0.05)", "gen_acc", "psft", "sft", "on_par", 0.05),
    Claim("Target-SFT (2606.11189)", "Target-SFT ≥ SFT in-domain (margin 0.02)", "gen_acc", "target_sft", "sft",
          "at_least", 0.02),
    Claim("Target-SFT (2606.11189)", "Target-SFT ≥ DFT in-domain (margin 0.02)", "gen_acc", "target_sft", "dft",
          "at_least", 0.02),
    Claim("Target-SFT (2606.11189)", "Target-SFT ≥ SFT on answer ranking (margin 0.02)", "rank_acc", "target_sft",
          "sft", "at_least", 0.02),
    Claim("ASFT (2509.23753)", "ASFT's KL anchor forgets less than DFT", "forgetting", "asft", "dft", "less"),
)


UNREADABLE = 0.5  # generation accuracy cannot be read when a row's format-failure interval lies above this


def evaluate_claims(items, *, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Each claim whose rows were run: the measured effect with its interval and the verdict. A claim
    on generation accuracy is inconclusive when most of a row's answers are surely malformed (its
    format-failure interval lies above UNREADABLE): then 0 = 0 says nothing about the objectives."""
    out = []
    for c in CLAIMS:
        e = estimate(items, c.metric, c.row, c.versus, n_boot=n_boot, seed=seed)
        if e is None:
            continue
        verdict, note = stats.verdict(e, c.kind, c.margin), ""
        if c.metric == "gen_acc":
            malformed = [r for r in (c.row, c.versus)
                         if (f := estimate(items, "format_fail", r, n_boot=n_boot, seed=seed)) and f.lo > UNREADABLE]
            if malformed:
                verdict = "inconclusive"
                note = f"most answers of {' and '.join(malformed)} are malformed"
        out.append({**asdict(c), "effect": e.to_dict(), "verdict": verdict, "note": note})
    return out


def analyze(items: dict[str, dict[str, Any]], *, n_boot: int, seed: int, reference: str = "sft") -> dict[str, Any]:
    """Everything the report shows, from the per-item values alone: estimates, paired differences from
    `reference`, claims. `items[row][key]`: nested lists or arrays [seeds, items] (results.json's)."""
    arrays = {r: {k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for r, d in items.items()}
    return {**summarize(arrays, reference=reference, n_boot=n_boot, seed=seed),
            "claims": evaluate_claims(arrays, n_boot=n_boot, seed=seed)}
