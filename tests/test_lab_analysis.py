"""The continuum's prior classes, computed from token scores end to end (planted p_y distributions shaped like
the built-in tasks' measured profiles), never from a task's name."""
from __future__ import annotations

import numpy as np

from qtarget.lab.analysis import CONTINUUM_CLAIMS, prior_classes
from qtarget.lab.metrics import TokenScores, prior_profile


def planted_scores(rng: np.random.Generator, share_low: float, n_seq: int = 40, length: int = 25) -> list[TokenScores]:
    """Sequences whose token p_y are below 0.1 with probability `share_low`, else spread over [0.3, 1)."""
    out = []
    for _ in range(n_seq):
        low = rng.random(length) < share_low
        p = np.where(low, rng.uniform(0.001, 0.099, length), rng.uniform(0.3, 1.0, length))
        out.append(TokenScores(np.log(p), np.zeros(length)))
    return out


def test_prior_classes_follow_the_measured_profiles_not_the_names():
    rng = np.random.default_rng(0)
    weak, strong, middle = (prior_profile(planted_scores(rng, s)) for s in (0.31, 0.015, 0.16))
    assert weak["share_low"] > 0.25 and strong["share_low"] < 0.05
    assert prior_classes({"glyph": weak, "sum": strong}) == {"glyph": "weak", "sum": "strong"}
    # the same names with the profiles swapped: the classes follow the profiles
    assert prior_classes({"glyph": strong, "sum": weak}) == {"glyph": "strong", "sum": "weak"}
    # three tasks: the extremes are classed, the one in between is not
    assert prior_classes({"a": middle, "b": weak, "c": strong}) == {"a": None, "b": "weak", "c": "strong"}
    # each on its own: a weak profile (median < 0.5 or >= 20 % low tokens) and a strong one
    flat_weak = prior_profile(planted_scores(rng, 0.45))
    assert flat_weak["median"] < 0.5
    assert prior_classes({"x": flat_weak}) == {"x": "weak"}
    assert prior_classes({"x": strong}) == {"x": "strong"}
    # the class picks the continuum claims: the fixes of DFT's low-prior failure only on the weak side
    assert {c.row for c in CONTINUUM_CLAIMS["weak"]} >= {"dft_floor", "prift"}
    assert not {c.row for c in CONTINUUM_CLAIMS["strong"]} & {"dft_floor", "prift"}
