"""From per-item values to estimates: each metric's value per row, each row's difference from SFT, and
the claims table. Every interval comes from `qtarget.lab.stats`; nothing here formats.

Per-item values (`items[row][key]`, arrays [S, N], one row per training seed; the base row has S = 1
and is broadcast against trained rows):
    gen.correct, gen.no_answer      generation: right answer / no "The answer is N" (format failure)
    rank.correct, rank.margin       answer ranking: the correct demonstration scores highest / its total
                                    log-prob minus the best distractor's
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
           "share of greedy answers that state no final answer in the task's form ('The answer is N' on the "
           "built-in tasks; on your data the form its demonstrations use), counted apart from wrong answers"),
    Metric("rank_acc", "answer ranking accuracy", 3, "higher",
           "held-out problems where the correct demonstration has a higher total log-prob than every "
           "corrupted one"),
    Metric("rank_margin", "ranking margin", 2, "higher",
           "held-out problems: total log-prob (nats) of the correct demonstration minus the best distractor's "
           "(the continuous version of ranking accuracy)"),
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
            "rank_margin": "rank.margin",
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


# The model-capability continuum (arXiv 2510.00526): objectives that lean on the prior (DFT-like, weighting a
# token by p_y) beat NLL where the base model is strong on the task and lose where it is weak. Which claims
# apply depends on the task's measured prior profile (`prior_class`).
CONTINUUM_CLAIMS: dict[str, tuple[Claim, ...]] = {
    "strong": (
        Claim("continuum (2510.00526)", "strong prior: DFT ≥ SFT in-domain (margin 0.02)", "gen_acc", "dft", "sft",
              "at_least", 0.02),
        Claim("continuum (2510.00526)", "strong prior: DFT ≥ SFT on held-out NLL (margin 0.02 nats)", "heldout_nll",
              "sft", "dft", "at_least", 0.02),
        Claim("Target-SFT (2606.11189)", "strong prior: Target-SFT ≥ SFT on the ranking margin", "rank_margin",
              "target_sft", "sft", "at_least", 0.1),
    ),
    "weak": (
        Claim("continuum (2510.00526)", "weak prior: SFT ≥ DFT in-domain (margin 0.02)", "gen_acc", "sft", "dft",
              "at_least", 0.02),
        Claim("continuum (2510.00526)", "weak prior: SFT ≥ DFT on held-out NLL (margin 0.02 nats)", "heldout_nll",
              "dft", "sft", "at_least", 0.02),
        Claim("Target-SFT (2606.11189)", "weak prior: Target-SFT ≥ SFT on the ranking margin", "rank_margin",
              "target_sft", "sft", "at_least", 0.1),
        Claim("DFT repo / floor", "weak prior: floored γ fails the format less than DFT", "format_fail", "dft_floor",
              "dft", "less"),
        Claim("PriFT (2606.09396)", "weak prior: γ from the base model (PriFT) fails the format less than DFT",
              "format_fail", "prift", "dft", "less"),
    ),
}
# a task's prior is "strong" when most demonstration tokens are already probable under the base model
STRONG_MEDIAN, STRONG_SHARE_LOW = 0.5, 0.2


RELATIVE_GAP = 0.03  # tasks whose shares of p_y < 0.1 differ by less than this are not ordered


def prior_class(profile: dict[str, Any] | None) -> str | None:
    """On its own, a task's prior is "strong" (median base p_y >= 0.5 and under 20 % of tokens with
    p_y < 0.1) or "weak"; None without a profile (results written before profiles existed)."""
    if not profile:
        return None
    strong = profile["median"] >= STRONG_MEDIAN and profile["share_low"] < STRONG_SHARE_LOW
    return "strong" if strong else "weak"


def prior_classes(profiles: dict[str, dict[str, Any] | None]) -> dict[str, str | None]:
    """The class of each task's prior. Several tasks are placed against each other (the continuum is an
    ordering): the one with the smallest share of tokens with p_y < 0.1 is "strong", the one with the largest
    "weak", the others unclassed, when the two shares differ by at least RELATIVE_GAP; otherwise, and for a
    single task, each task is classed on its own (`prior_class`)."""
    known = {t: p for t, p in profiles.items() if p}
    out: dict[str, str | None] = {t: prior_class(p) for t, p in profiles.items()}
    if len(known) >= 2:
        order = sorted(known, key=lambda t: (known[t]["share_low"], -known[t]["median"]))
        if known[order[-1]]["share_low"] - known[order[0]]["share_low"] >= RELATIVE_GAP:
            out.update({t: None for t in known})
            out[order[0]], out[order[-1]] = "strong", "weak"
    return out


UNREADABLE = 0.5  # generation accuracy cannot be read when a row's format-failure interval lies above this


# a metric of the trained rows themselves relative to base (no value for base): "differs from base" = its own
# interval excludes 0
RELATIVE_TO_BASE = ("noise_fit", "forgetting")


def separates(items, metric: str, *, n_boot: int, seed: int) -> bool | None:
    """Whether any trained row differs from the base model on `metric` beyond its interval (the paired
    difference row − base excludes 0; for metrics already relative to base, the row's own interval excludes
    0). None when no trained row has the metric. A claim on a metric that separates nothing is vacuous."""
    found = False
    for row in items:
        if row == "base":
            continue
        e = (estimate(items, metric, row, n_boot=n_boot, seed=seed) if metric in RELATIVE_TO_BASE or "base" not in items
             else estimate(items, metric, row, "base", n_boot=n_boot, seed=seed))
        if e is None:
            continue
        found = True
        if e.lo > 0 or e.hi < 0:
            return True
    return False if found else None


def evaluate_claims(items, *, n_boot: int, seed: int, prior: str | None = None,
                    metrics: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Each claim whose rows were run (the general ones, plus the continuum claims for a task whose prior is
    `prior`; only those on `metrics` when given): the measured effect with its interval and the verdict.
    A verdict is *inconclusive* when the metric does not separate (no trained row differs from base beyond
    its interval), and a claim on generation accuracy also when most of a row's answers are surely malformed
    (its format-failure interval lies above UNREADABLE): then 0 = 0 says nothing about the objectives.
    Every inconclusive verdict names its `rule` (malformed, no_separation, or from the interval: margin,
    few_items; `stats.inconclusive_reason`) and says why in `reason`; `note` keeps the two override rules."""
    out = []
    claims = CLAIMS + (CONTINUUM_CLAIMS.get(prior, ()) if prior else ())
    separation: dict[str, bool | None] = {}
    for c in claims:
        if metrics is not None and c.metric not in metrics:
            continue
        e = estimate(items, c.metric, c.row, c.versus, n_boot=n_boot, seed=seed)
        if e is None:
            continue
        verdict, note, rule = stats.verdict(e, c.kind, c.margin), "", ""
        if c.metric not in separation:
            separation[c.metric] = separates(items, c.metric, n_boot=n_boot, seed=seed)
        if c.metric == "gen_acc":
            malformed = [r for r in (c.row, c.versus)
                         if (f := estimate(items, "format_fail", r, n_boot=n_boot, seed=seed)) and f.lo > UNREADABLE]
            if malformed:
                verdict, rule = "inconclusive", "malformed"
                note = f"most answers of {' and '.join(malformed)} are malformed"
        if not note and separation[c.metric] is False:
            verdict, note, rule = "inconclusive", NO_SEPARATION, "no_separation"
        reason = note
        if not note and verdict == "inconclusive":
            rule, reason = stats.inconclusive_reason(e, c.kind, c.margin, step=item_step(c.metric, e))
        out.append({**asdict(c), "effect": e.to_dict(), "verdict": verdict, "note": note, "rule": rule,
                    "reason": reason})
    return out


# metrics whose per-item values are 0/1: one item moves a seed's mean by 1 / items
BINARY = ("gen_acc", "format_fail", "rank_acc")


def item_step(metric: str, e: stats.Estimate) -> float | None:
    """The change one item makes to the mean of a 0/1 metric (None for continuous metrics)."""
    return 1.0 / (e.n * e.seeds) if metric in BINARY else None


NO_SEPARATION = "metric does not separate: no trained row differs from base beyond its interval"
TEACHER_FORCED = ("rank_acc", "rank_margin", "noise_fit", "forgetting", "entropy", "heldout_nll")


def budget_claims(curves: dict[str, dict[str, dict[str, Any]]], base_items: dict[str, Any], *, n_boot: int,
                  seed: int, prior: str | None = None) -> list[dict[str, Any]]:
    """Every claim on a teacher-forced metric, evaluated at each learning-curve checkpoint: per claim its
    effect and verdict after each step, and whether the verdict changes with the budget (`flips`: it is
    supported at one budget and contradicted at another; `changes`: any change)."""
    steps = sorted({int(st) for row in curves.values() for st in row}, key=int)
    by_claim: dict[tuple, dict[str, Any]] = {}
    for step in steps:
        at = {"base": base_items} | {row: pts[str(step)] for row, pts in curves.items() if str(step) in pts}
        arrays = {r: {k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for r, d in at.items()}
        for c in evaluate_claims(arrays, n_boot=n_boot, seed=seed, prior=prior, metrics=TEACHER_FORCED):
            key = (c["statement"], c["row"], c["versus"], c["metric"])
            entry = by_claim.setdefault(key, {k: c[k] for k in ("source", "statement", "metric", "row", "versus",
                                                                 "kind", "margin")} | {"points": []})
            entry["points"].append({"step": step, "effect": c["effect"], "verdict": c["verdict"], "note": c["note"],
                                    "reason": c["reason"]})
    out = []
    for entry in by_claim.values():
        verdicts = [p["verdict"] for p in entry["points"]]
        entry["flips"] = "supported" in verdicts and "contradicted" in verdicts
        entry["changes"] = len(set(verdicts)) > 1
        out.append(entry)
    return out


# -------------------------------------------------------------------------------------- which row won
# the metrics a row "wins" on, in the order a single answer is read from: the task's own success (generation
# accuracy), then the teacher-forced preference for the right answer and the fit to held-out demonstrations
DECISION_METRICS = ("gen_acc", "rank_margin", "heldout_nll")


def winner(items, metric: str, *, n_boot: int, seed: int) -> dict[str, Any] | None:
    """The trained row with the best point estimate on `metric`, with its interval, and its paired difference
    from the runner-up (oriented so that > 0 favours the winner). `decided`: that interval excludes 0; `tied`:
    the other rows whose paired difference from the winner does not exclude 0. None with fewer than two
    trained rows measured."""
    m = METRIC_BY_KEY[metric]
    sign = -1.0 if m.better == "lower" else 1.0
    ests = {r: e for r in items if r != "base" and (e := estimate(items, metric, r, n_boot=n_boot, seed=seed))}
    if len(ests) < 2:
        return None
    order = sorted(ests, key=lambda r: -sign * ests[r].value)  # stable: rows keep their run order on ties

    def lead(other: str) -> stats.Estimate:
        d = estimate(items, metric, order[0], other, n_boot=n_boot, seed=seed)
        return stats.Estimate(sign * d.value, *sorted((sign * d.lo, sign * d.hi)), d.n, d.seeds, d.level)

    margin = lead(order[1])
    tied = [r for r in order[1:] if lead(r).lo <= 0]
    return {"metric": metric, "row": order[0], "value": ests[order[0]].to_dict(), "runner_up": order[1],
            "lead": margin.to_dict(), "decided": margin.lo > 0, "tied": tied}


def winners(items, *, n_boot: int, seed: int, metrics: tuple[str, ...] = DECISION_METRICS) -> list[dict[str, Any]]:
    """`winner` on each decision metric that at least two trained rows have."""
    return [w for m in metrics if (w := winner(items, m, n_boot=n_boot, seed=seed))]


def analyze(items: dict[str, dict[str, Any]], *, n_boot: int, seed: int, reference: str = "sft",
            prior: str | None = None) -> dict[str, Any]:
    """Everything the report shows for one task, from the per-item values alone: estimates, paired
    differences from `reference`, claims, the row that won each decision metric. `items[row][key]`: nested
    lists or arrays [seeds, items]."""
    arrays = {r: {k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for r, d in items.items()}
    return {**summarize(arrays, reference=reference, n_boot=n_boot, seed=seed),
            "claims": evaluate_claims(arrays, n_boot=n_boot, seed=seed, prior=prior),
            "winners": winners(arrays, n_boot=n_boot, seed=seed)}


def analyze_lab(results: dict[str, Any]) -> dict[str, Any]:
    """Statistics of every task of a lab run (added to each `results["per_task"][task]` in place: estimates,
    vs_reference, claims, budget, prior_class) and the continuum summary across tasks (returned)."""
    s = results["settings"]
    kw = dict(n_boot=s["n_boot"], seed=s["seed"])
    classes = prior_classes({t: e.get("prior") for t, e in results["per_task"].items()})
    for task, entry in results["per_task"].items():
        cls = classes[task]
        entry["prior_class"] = cls
        entry.update(analyze(entry["items"], prior=cls, **kw))
        base = {k: v for k, v in entry["items"].get("base", {}).items() if not k.startswith("gen.")}
        # verdicts against the budget need two checkpoints or more (--curve_points 1 measures the end only)
        steps = {st for row in (entry.get("curves") or {}).values() for st in row}
        entry["budget"] = budget_claims(entry["curves"], base, prior=cls, **kw) if len(steps) > 1 else []
        entry["curve_estimates"] = curve_estimates(entry.get("curves") or {}, base, **kw)
    return {"continuum": continuum_summary(results["per_task"])}


def curve_estimates(curves: dict[str, dict[str, dict[str, Any]]], base_items: dict[str, Any], *, n_boot: int,
                    seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{row: {step: {metric: Estimate dict}}}: every teacher-forced metric of every trained row after each
    checkpoint (the learning curves)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row, by_step in curves.items():
        for step, values in by_step.items():
            arrays = {"base": {k: np.asarray(v, dtype=np.float64) for k, v in base_items.items()},
                      row: {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}}
            for m in TEACHER_FORCED:
                e = estimate(arrays, m, row, n_boot=n_boot, seed=seed)
                if e is not None:
                    out.setdefault(row, {}).setdefault(step, {})[m] = e.to_dict()
    return out


CONTINUUM_METRICS = ("gen_acc", "format_fail", "rank_margin", "heldout_nll", "noise_fit")


def continuum_summary(per_task: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task: its prior profile and class, and every row's paired difference from SFT on the metrics that
    place objectives on the continuum."""
    out = []
    for name, entry in per_task.items():
        out.append({"task": name, "prior": entry.get("prior"), "prior_class": entry.get("prior_class"),
                    "vs_sft": {row: {m: d[m] for m in CONTINUUM_METRICS if m in d}
                               for row, d in entry.get("vs_reference", {}).items() if d}})
    return out


# what results.json files written before tasks were values said (the arithmetic task was the only one)
LEGACY_TASK = {"name": "shop", "version": "2", "description": "procedural arithmetic word problems with a compact "
               "chain of thought, one equation per step", "noise": "half with a corrupted step (a wrong result "
               "carried to a wrong final answer), half in a non-unique alternative form (operands swapped, words "
               "instead of symbols, another closing phrase)", "instruction": None}


def upgrade_results(results: dict[str, Any]) -> dict[str, Any]:
    """A results.json written before the lab ran several tasks (one task at the top level) in today's
    layout (`per_task`), so `--report_from` still reads it."""
    if "per_task" in results:
        return results
    data = results.get("data", {})
    data.setdefault("task", dict(LEGACY_TASK))
    name = data["task"]["name"]
    results["per_task"] = {name: {"teacher": results.pop("teacher", None), "data": results.pop("data", {}),
                                  "prior": None, "rows": results.pop("rows", {}), "items": results.pop("items", {}),
                                  "curves": {}, "curve_steps": [], "responses": results.pop("responses", {})}}
    for key in ("estimates", "vs_reference", "reference", "claims"):
        results.pop(key, None)
    results["tasks"] = [name]
    return results
