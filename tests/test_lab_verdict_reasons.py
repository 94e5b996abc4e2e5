"""Verdicts that explain themselves: every *inconclusive* verdict names its rule (the margin, too few items,
a metric that does not separate, malformed answers), on planted intervals and planted per-item values; and
the row that won each decision metric, against paired differences computed here with numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qtarget.lab import stats
from qtarget.lab.analysis import NO_SEPARATION, evaluate_claims, winner, winners
from qtarget.lab.report import claims_table, winners_table
from qtarget.lab.stats import Estimate, inconclusive_reason, items_needed


def est(lo: float, hi: float, n: int = 100, value: float | None = None, seeds: int = 1) -> Estimate:
    return Estimate((lo + hi) / 2 if value is None else value, lo, hi, n, seeds)


@pytest.mark.parametrize("lo, hi, kind, margin, bound", [
    (-0.200, -0.017, "at_least", 0.02, "-0.02"),   # behind, but not by more than the margin at the upper end
    (0.010, 0.070, "on_par", 0.05, "±0.05"),       # ahead of 0, crosses +margin
    (-0.080, -0.030, "on_par", 0.05, "±0.05"),     # behind 0, crosses -margin
])
def test_an_interval_that_excludes_0_is_inconclusive_by_the_margin_and_says_so(lo, hi, kind, margin, bound):
    e = est(lo, hi)
    assert (e.lo > 0 or e.hi < 0) and stats.verdict(e, kind, margin) == "inconclusive"
    rule, text = inconclusive_reason(e, kind, margin)
    assert rule == "margin"
    assert text.startswith("margin rule") and bound in text and f"[{lo:+.3f}, {hi:+.3f}]" in text


def test_an_interval_over_the_boundary_says_how_many_items_would_decide_it():
    e = est(-0.01, 0.11, n=100, value=0.05)
    rule, text = inconclusive_reason(e, "greater")
    # half-width 0.06 at distance 0.05 from 0: n (h / d)^2 items, computed here on its own
    expected = math.ceil(100 * (0.06 / 0.05) ** 2)
    assert rule == "few_items" and items_needed(e, 0.0) == expected == 144
    assert f"about {expected} items would decide it (now 100)" in text and "contains 0" in text
    # for a margin claim the boundary is the margin, not 0
    rule, text = inconclusive_reason(est(-0.03, 0.05, n=200, value=0.01), "at_least", 0.02)
    assert rule == "few_items" and "contains the margin -0.02" in text
    assert f"about {math.ceil(200 * (0.04 / 0.03) ** 2)} items" in text
    # an estimate sitting on the boundary: no number of items decides it
    assert "no number of items" in inconclusive_reason(est(-0.05, 0.05, value=0.0), "greater")[1]
    # an estimate just off the boundary: "about N" would be no guide
    assert "more than 10x the 100 items" in inconclusive_reason(est(-0.1, 0.1, value=0.001), "greater")[1]


def test_a_margin_finer_than_one_item_is_too_few_items():
    """0/1 accuracy on 20 items: one item moves the mean by 0.05, more than the 0.02 margin."""
    e = est(-0.10, 0.05, n=20, value=-0.025)
    rule, text = inconclusive_reason(e, "at_least", 0.02, step=1 / 20)
    assert rule == "few_items" and "one of the 20 items moves the mean by 0.050" in text and "margin 0.02" in text


@pytest.mark.parametrize("lo, hi, kind, margin", [(0.01, 0.2, "greater", 0), (-0.3, -0.1, "greater", 0),
                                                  (-0.01, 0.1, "at_least", 0.02), (-0.03, 0.04, "on_par", 0.05)])
def test_a_decided_verdict_has_no_reason(lo, hi, kind, margin):
    assert stats.verdict(est(lo, hi), kind, margin) != "inconclusive"
    assert inconclusive_reason(est(lo, hi), kind, margin) == ("", "")


def _gen(correct: np.ndarray) -> dict:
    return {"gen.correct": [correct], "gen.no_answer": [np.zeros_like(correct)]}


def test_claims_carry_the_rule_and_the_report_prints_it():
    """Planted generation results on 400 items: the base answers nothing, sft half; target_sft loses 12
    items sft got right (−0.03, interval about [−0.05, −0.01]): behind SFT beyond 0 but not beyond the 0.02
    margin -> inconclusive by the margin rule; psft equals sft (on par: supported); dft never states an
    answer -> the malformed rule."""
    n = 400
    sft = (np.arange(n) % 2 == 0).astype(float)
    target = sft.copy()
    target[np.flatnonzero(sft)[:12]] = 0.0
    items = {"base": _gen(np.zeros(n)), "sft": _gen(sft), "target_sft": _gen(target), "psft": _gen(sft.copy()),
             "dft": {"gen.correct": [np.zeros(n)], "gen.no_answer": [np.ones(n)]}}
    claims = {c["statement"]: c for c in evaluate_claims(items, n_boot=1000, seed=0)}
    c = claims["Target-SFT ≥ SFT in-domain (margin 0.02)"]
    assert c["effect"]["value"] == pytest.approx((target - sft).mean()) == pytest.approx(-0.03)
    assert c["effect"]["hi"] < 0 < c["effect"]["hi"] + 0.02 and c["verdict"] == "inconclusive"
    assert c["rule"] == "margin" and c["note"] == "" and "margin rule" in c["reason"] and "-0.02" in c["reason"]
    assert claims["PSFT is on par with SFT in-domain (±0.05)"]["verdict"] == "supported"
    assert claims["PSFT is on par with SFT in-domain (±0.05)"]["reason"] == ""
    c = claims["DFT beats SFT in-domain"]
    assert c["rule"] == "malformed" and c["reason"] == c["note"] == "most answers of dft are malformed"
    table = claims_table({"claims": list(claims.values())})
    assert "**inconclusive** (margin rule: the interval" in table
    # a metric that separates nothing: the no-separation rule, whatever the interval says
    same = {r: _gen(sft.copy()) for r in ("base", "sft", "target_sft")}
    c = next(c for c in evaluate_claims(same, n_boot=500, seed=0) if c["row"] == "target_sft")
    assert c["rule"] == "no_separation" and c["reason"] == NO_SEPARATION


def test_every_inconclusive_claim_names_a_rule():
    rng = np.random.default_rng(5)
    n = 60
    items = {r: _gen((rng.random(n) < p).astype(float)) for r, p in
             (("base", 0.1), ("sft", 0.5), ("dft", 0.45), ("psft", 0.52), ("target_sft", 0.48))}
    for r in items:
        items[r]["rank.correct"] = [(rng.random(64) < 0.6).astype(float)]
    for c in evaluate_claims(items, n_boot=500, seed=0):
        assert (c["verdict"] == "inconclusive") == bool(c["rule"]) == bool(c["reason"])
        assert c["rule"] in ("", "margin", "few_items", "no_separation", "malformed")


def test_the_winner_and_its_lead_against_numpy():
    rng = np.random.default_rng(11)
    n = 300
    sft = (rng.random(n) < 0.5).astype(float)
    dft = np.maximum(sft, (rng.random(n) < 0.3).astype(float))   # right wherever sft is, and more
    psft = sft.copy()
    psft[:5] = 1 - psft[:5]
    items = {"base": _gen(np.zeros(n)), "sft": _gen(sft), "dft": _gen(dft), "psft": _gen(psft)}
    w = winner(items, "gen_acc", n_boot=1000, seed=0)
    assert w["row"] == "dft" and w["value"]["value"] == pytest.approx(dft.mean())
    runner = "sft" if sft.mean() >= psft.mean() else "psft"
    assert w["runner_up"] == runner
    assert w["lead"]["value"] == pytest.approx((dft - items[runner]["gen.correct"][0]).mean())
    ref = stats.paired_difference(dft, items[runner]["gen.correct"][0], n_boot=1000, seed=0)
    assert (w["lead"]["lo"], w["lead"]["hi"]) == pytest.approx((ref.lo, ref.hi))
    assert w["decided"] == (ref.lo > 0) is True and w["tied"] == []
    # lower is better (held-out NLL): the lead is oriented so that > 0 favours the winner
    nll = {r: {"rank.nll": [rng.normal(mu, 0.3, 80)]} for r, mu in (("sft", 1.0), ("dft", 1.02), ("psft", 2.0))}
    w = winner(nll, "heldout_nll", n_boot=1000, seed=0)
    a, b = nll[w["row"]]["rank.nll"][0], nll[w["runner_up"]]["rank.nll"][0]
    assert a.mean() < b.mean() and w["lead"]["value"] == pytest.approx(b.mean() - a.mean())
    assert w["lead"]["lo"] <= w["lead"]["value"] <= w["lead"]["hi"]
    assert "psft" not in w["tied"]  # 1 nat behind: separated
    assert winner({"base": _gen(sft), "sft": _gen(sft)}, "gen_acc", n_boot=200, seed=0) is None  # one trained row
    table = winners_table({"winners": winners(items, n_boot=500, seed=0)})
    assert "**dft**" in table and "yes: the lead's interval excludes 0" in table
