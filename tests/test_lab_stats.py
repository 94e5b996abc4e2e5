"""The lab's statistics against closed forms on synthetic data, and verdicts against their intervals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qtarget.lab.stats import Estimate, group_difference, mean_interval, paired_difference, verdict

Z = 1.959963984540054  # standard normal 0.975 quantile


def normal_half_width(x: np.ndarray) -> float:
    """Closed form: z * sd / sqrt(n) (population sd, as the bootstrap's plug-in uses)."""
    return Z * x.std() / math.sqrt(x.size)


def test_mean_interval_matches_the_normal_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=3000)
    est = mean_interval(x, n_boot=4000, seed=2)
    assert est.value == pytest.approx(x.mean())
    assert est.n == 3000 and est.seeds == 1
    assert est.half_width == pytest.approx(normal_half_width(x), rel=0.08)
    assert (est.lo + est.hi) / 2 == pytest.approx(x.mean(), abs=0.1 * normal_half_width(x))


def test_accuracy_interval_matches_wald():
    # 0/1 items: the interval of an accuracy p over n items ~ p +- z sqrt(p(1-p)/n)
    x = np.zeros(2000)
    x[:600] = 1
    est = mean_interval(x, n_boot=4000, seed=0)
    assert est.value == pytest.approx(0.3)
    assert est.half_width == pytest.approx(Z * math.sqrt(0.3 * 0.7 / 2000), rel=0.08)


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 5.0, size=2000)          # item difficulty, common to both models
    a = shared + 0.3 + rng.normal(0, 0.5, size=2000)
    b = shared + rng.normal(0, 0.5, size=2000)
    est = paired_difference(a, b, n_boot=4000, seed=1)
    d = a - b
    assert est.value == pytest.approx(d.mean())
    assert est.half_width == pytest.approx(normal_half_width(d), rel=0.08)
    # unpaired closed form would be ~10x wider: the pairing removes the shared item variance
    unpaired = Z * math.sqrt(a.var() / a.size + b.var() / b.size)
    assert est.half_width < unpaired / 5
    assert est.lo > 0  # the planted +0.3 is detected


def test_group_difference_matches_the_two_sample_closed_form():
    rng = np.random.default_rng(4)
    a = rng.normal(1.0, 1.0, size=1500)
    b = rng.normal(0.0, 3.0, size=800)
    est = group_difference(a, b, n_boot=4000, seed=5)
    assert est.value == pytest.approx(a.mean() - b.mean())
    assert est.n == 2300
    assert est.half_width == pytest.approx(Z * math.sqrt(a.var() / a.size + b.var() / b.size), rel=0.08)


def test_seed_level_resampling():
    # items identical within a seed: all the uncertainty is between seeds -> z * sd(seed means) / sqrt(S)
    rng = np.random.default_rng(6)
    seed_means = rng.normal(0.5, 0.2, size=1000)
    x = np.repeat(seed_means[:, None], 3, axis=1)                       # [S=1000, N=3]
    est = mean_interval(x, n_boot=4000, seed=7)
    assert est.seeds == 1000
    assert est.half_width == pytest.approx(normal_half_width(seed_means), rel=0.08)
    # and with one seed the same numbers would give a zero-width interval (nothing varies over items)
    one = mean_interval(x[:1], seed=7)
    assert one.lo == one.hi == pytest.approx(x[0, 0])


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="claim kind"):
        verdict(Estimate(0.1, 0.05, 0.2, 10, 1), "bigger")


@pytest.mark.parametrize("lo,hi,kind,margin,expected", [
    (0.01, 0.2, "greater", 0, "supported"),
    (-0.01, 0.2, "greater", 0, "inconclusive"),
    (-0.3, -0.01, "greater", 0, "contradicted"),
    (-0.3, -0.01, "less", 0, "supported"),
    (0.02, 0.3, "less", 0, "contradicted"),
    (-0.04, 0.1, "at_least", 0.05, "supported"),
    (-0.09, 0.1, "at_least", 0.05, "inconclusive"),
    (-0.2, -0.06, "at_least", 0.05, "contradicted"),
    (-0.03, 0.04, "on_par", 0.05, "supported"),
    (-0.03, 0.07, "on_par", 0.05, "inconclusive"),
    (0.06, 0.2, "on_par", 0.05, "contradicted"),
])
def test_verdict_follows_the_interval(lo, hi, kind, margin, expected):
    assert verdict(Estimate((lo + hi) / 2, lo, hi, 100, 1), kind, margin) == expected


def _items(acc_dft, acc_sft, malformed_dft):
    n = len(acc_dft)
    return {"dft": {"gen.correct": [acc_dft], "gen.no_answer": [[float(malformed_dft)] * n]},
            "sft": {"gen.correct": [acc_sft], "gen.no_answer": [[0.0] * n]}}


def test_claims_follow_the_paired_interval_and_refuse_unreadable_accuracy():
    from qtarget.lab.analysis import evaluate_claims

    rng = np.random.default_rng(8)
    sft = (rng.random(400) < 0.3).astype(float)
    better = np.maximum(sft, (rng.random(400) < 0.3).astype(float))      # dft right wherever sft is, and more
    (claim,) = [c for c in evaluate_claims(_items(better, sft, False), n_boot=1000, seed=0)
                if c["statement"] == "DFT beats SFT in-domain"]
    d = better - sft
    assert claim["effect"]["value"] == pytest.approx(d.mean())
    assert claim["effect"]["lo"] > 0 and claim["verdict"] == "supported"
    (claim,) = [c for c in evaluate_claims(_items(sft, better, False), n_boot=1000, seed=0)
                if c["statement"] == "DFT beats SFT in-domain"]
    assert claim["verdict"] == "contradicted"
    # every dft answer malformed: 0 correct says nothing about the objective -> inconclusive, with the reason
    (claim,) = [c for c in evaluate_claims(_items(np.zeros(400), sft, True), n_boot=1000, seed=0)
                if c["statement"] == "DFT beats SFT in-domain"]
    assert claim["effect"]["hi"] < 0 and claim["verdict"] == "inconclusive" and "dft" in claim["note"]


def test_a_metric_that_separates_nothing_gives_no_verdict():
    """Planted: every trained row equals the base model on answer ranking. "Target-SFT >= SFT" would be
    'supported' from its interval alone ([0, 0] lies above -0.02), but no row differs from base, so the metric
    does not separate and the verdict is inconclusive; once one row moves away from base, it counts again."""
    from qtarget.lab.analysis import NO_SEPARATION, evaluate_claims, separates

    rng = np.random.default_rng(3)
    same = (rng.random(300) < 0.8).astype(float)
    items = {r: {"rank.correct": [same]} for r in ("base", "sft", "dft", "target_sft")}
    assert separates(items, "rank_acc", n_boot=500, seed=0) is False
    (claim,) = [c for c in evaluate_claims(items, n_boot=500, seed=0) if c["statement"].startswith("Target-SFT ≥ SFT on")]
    assert verdict(Estimate(**claim["effect"]), claim["kind"], claim["margin"]) == "supported"
    assert claim["verdict"] == "inconclusive" and claim["note"] == NO_SEPARATION
    items["dft"]["rank.correct"] = [np.ones(300)]     # dft now differs from base beyond its interval
    assert separates(items, "rank_acc", n_boot=500, seed=0) is True
    (claim,) = [c for c in evaluate_claims(items, n_boot=500, seed=0) if c["statement"].startswith("Target-SFT ≥ SFT on")]
    assert claim["verdict"] == "supported" and claim["note"] == ""
    # a metric relative to base (noise fit: the gain itself): separates when a row's own interval excludes 0
    noise = {"base": {}, "sft": {"noise.corrupt": [rng.normal(0, 1, 80)], "noise.clean": [rng.normal(0, 1, 80)]}}
    assert separates(noise, "noise_fit", n_boot=500, seed=0) is False
    noise["sft"]["noise.corrupt"] = [rng.normal(3, 1, 80)]
    assert separates(noise, "noise_fit", n_boot=500, seed=0) is True
    assert separates(noise, "gen_acc", n_boot=500, seed=0) is None


def test_prior_classes_order_several_tasks_and_class_one_on_its_own():
    from qtarget.lab.analysis import prior_classes

    def profile(median, share):
        return {"median": median, "share_low": share}

    assert prior_classes({"a": profile(0.9, 0.05), "b": profile(0.8, 0.15)}) == {"a": "strong", "b": "weak"}
    assert prior_classes({"a": profile(0.9, 0.10), "b": profile(0.3, 0.40), "c": profile(0.6, 0.2)}) == \
        {"a": "strong", "b": "weak", "c": None}
    # too close to order: each on its own
    assert prior_classes({"a": profile(0.9, 0.10), "b": profile(0.8, 0.11)}) == {"a": "strong", "b": "strong"}
    assert prior_classes({"a": profile(0.3, 0.5)}) == {"a": "weak"}
    assert prior_classes({"a": None}) == {"a": None}
