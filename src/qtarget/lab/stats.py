"""All of the lab's statistics: bootstrap intervals, paired differences and verdicts.

Every metric hands in per-item values as an array `[S, N]`: S training seeds (rows) by N items
(columns; the same evaluation items for every seed). One bootstrap replicate draws S seeds with
replacement and N item columns with replacement (the same columns for every drawn seed, since the
items are shared) and recomputes the statistic; the interval is the percentile interval of the
replicates. With S = 1 this is the ordinary bootstrap over items.

A statistic may combine several independent groups of items (e.g. "gain on corrupted tokens minus
gain on clean tokens", two different sets of demonstrations): each group's columns are drawn on their
own, the seed draw is shared.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
VERDICTS = ("supported", "contradicted", "inconclusive")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval [lo, hi] at `level`; n = items, seeds = S."""

    value: float
    lo: float
    hi: float
    n: int
    seeds: int
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def to_dict(self) -> dict:
        return asdict(self)


def as_matrix(values: Sequence[float] | Sequence[Sequence[float]] | np.ndarray, name: str = "values") -> np.ndarray:
    """Per-item values -> float array [S, N]; a 1-D input is one seed."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected per-item values [N] or [seeds, N], got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: needs at least one seed and one item, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: per-item values must be finite")
    return a


def bootstrap(groups: Sequence[np.ndarray], combine: Callable[[np.ndarray], np.ndarray], *,
              n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Estimate:
    """Percentile bootstrap of `combine(group means)`.

    groups: arrays [S, N_g] with the same S. combine: maps group means `[..., G]` to the statistic
    `[...]` (vectorised over replicates). Returns the statistic on the data and its interval."""
    if not groups:
        raise ValueError("bootstrap: give at least one group of per-item values")
    mats = [as_matrix(g, f"group {i}") for i, g in enumerate(groups)]
    n_seeds = mats[0].shape[0]
    if any(m.shape[0] != n_seeds for m in mats):
        raise ValueError(f"bootstrap: every group needs the same number of seeds, got {[m.shape[0] for m in mats]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")
    rng = np.random.default_rng(seed)
    point = float(combine(np.array([m.mean() for m in mats])))
    seed_idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds)) if n_seeds > 1 else np.zeros((n_boot, 1), int)
    means = np.empty((n_boot, len(mats)))
    for g, m in enumerate(mats):
        item_idx = rng.integers(0, m.shape[1], size=(n_boot, m.shape[1]))
        # mean over the drawn seeds of the mean over the drawn items: [B]
        per_seed_item_mean = m[:, item_idx].mean(axis=2).T  # [S, B, N] -> [B, S]
        means[:, g] = np.take_along_axis(per_seed_item_mean, seed_idx, axis=1).mean(axis=1)
    reps = np.asarray(combine(means), dtype=np.float64)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    return Estimate(value=point, lo=float(lo), hi=float(hi), n=int(sum(m.shape[1] for m in mats)),
                    seeds=n_seeds, level=level)


def mean_interval(values, **kw) -> Estimate:
    """Mean of per-item values with its bootstrap interval."""
    return bootstrap([values], lambda m: m[..., 0], **kw)


def paired_difference(a, b, **kw) -> Estimate:
    """mean(a - b) over the same items (and seeds): a and b [S, N] measured on identical items."""
    a, b = as_matrix(a, "a"), as_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: a and b must be measured on the same items, shapes {a.shape} vs {b.shape}")
    return mean_interval(a - b, **kw)


def group_difference(a, b, **kw) -> Estimate:
    """mean(a) - mean(b) for two independent groups of items (each resampled on its own)."""
    return bootstrap([a, b], lambda m: m[..., 0] - m[..., 1], **kw)


# ---------------------------------------------------------------------------------------- verdicts
# A claim's effect is oriented so that its direction is stated by `kind`:
#   greater      effect > 0       supported if lo > 0,            contradicted if hi < 0
#   less         effect < 0       supported if hi < 0,            contradicted if lo > 0
#   at_least     effect >= -m     supported if lo > -m,           contradicted if hi < -m   (non-inferiority)
#   on_par       |effect| <= m    supported if -m < lo, hi < m,   contradicted if lo > m or hi < -m
CLAIM_KINDS = ("greater", "less", "at_least", "on_par")


def verdict(est: Estimate, kind: str, margin: float = 0.0) -> str:
    """supported / contradicted / inconclusive, from the interval alone."""
    if kind not in CLAIM_KINDS:
        raise ValueError(f"claim kind must be one of {CLAIM_KINDS}, got {kind!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    lo, hi = est.lo, est.hi
    if kind == "greater":
        return "supported" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"
    if kind == "less":
        return "supported" if hi < 0 else "contradicted" if lo > 0 else "inconclusive"
    if kind == "at_least":
        return "supported" if lo > -margin else "contradicted" if hi < -margin else "inconclusive"
    if -margin < lo and hi < margin:
        return "supported"
    return "contradicted" if lo > margin or hi < -margin else "inconclusive"


# ------------------------------------------------------------------------------ why inconclusive
# the rule that leaves a claim without a verdict (analysis.evaluate_claims adds "malformed" and "no_separation")
RULES = ("margin", "few_items")
FAR = 10  # beyond this many times the items, "about N items" is no guide: the estimate sits at the boundary


def boundaries(kind: str, margin: float = 0.0) -> tuple[float, ...]:
    """The effect values a claim's interval must clear: 0 (greater / less), −margin (at_least), ±margin (on_par)."""
    if kind not in CLAIM_KINDS:
        raise ValueError(f"claim kind must be one of {CLAIM_KINDS}, got {kind!r}")
    return {"greater": (0.0,), "less": (0.0,), "at_least": (-margin,), "on_par": (-margin, margin)}[kind]


def items_needed(est: Estimate, boundary: float) -> int | None:
    """Items that would shrink the interval (half-width ∝ 1/√n) until it clears `boundary` at the same point
    estimate; None when the estimate sits on the boundary (no number of items decides it)."""
    distance = abs(est.value - boundary)
    if distance == 0:
        return None
    return int(math.ceil(est.n * (est.half_width / distance) ** 2))


def inconclusive_reason(est: Estimate, kind: str, margin: float = 0.0, *, step: float | None = None
                        ) -> tuple[str, str]:
    """(rule, text): why the interval alone gives no verdict; ("", "") when it gives one.

    margin      the interval excludes 0 but contains a margin boundary: only the margin keeps the claim open
    few_items   the interval contains the boundary: with `step` (the change one item makes to a 0/1 mean)
                larger than the margin, no interval can resolve it; otherwise the items that would decide an
                effect of this size (half-width ∝ 1/√n)"""
    if verdict(est, kind, margin) != "inconclusive":
        return "", ""
    interval = f"[{est.lo:+.3f}, {est.hi:+.3f}]"
    inside = [b for b in boundaries(kind, margin) if est.lo <= b <= est.hi]
    if (est.lo > 0 or est.hi < 0) and margin > 0:
        side = "all above" if kind == "at_least" else "all within"
        bound = f"-{margin:g}" if kind == "at_least" else f"±{margin:g}"
        return "margin", (f"margin rule: the interval {interval} excludes 0 but contains the margin {bound}; "
                          f"supported needs it {side} {bound}, contradicted needs it all beyond")
    if step is not None and 0 < margin < step:
        return "few_items", (f"too few items: one of the {est.n} items moves the mean by {step:.3f}, more than the "
                             f"margin {margin:g}, so the interval {interval} cannot clear it")
    boundary = min(inside, key=lambda b: abs(est.value - b))
    needed = items_needed(est, boundary)
    where = "contains 0" if boundary == 0 else f"contains the margin {boundary:+g}"
    if needed is None:
        return "few_items", f"the interval {interval} {where} and the estimate sits on it: no number of items decides it"
    if needed > FAR * est.n:
        return "few_items", (f"too few items: the interval {interval} {where} and the estimate ({est.value:+.3f}) "
                             f"sits close to it: more than {FAR}x the {est.n} items would be needed to decide it")
    return "few_items", (f"too few items: the interval {interval} {where}; at this effect ({est.value:+.3f}) about "
                         f"{needed} items would decide it (now {est.n})")
