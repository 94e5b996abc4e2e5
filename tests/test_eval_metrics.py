"""pass@k against its closed form and brute-force enumeration; summaries on hand-built records."""
from __future__ import annotations

import itertools
import math

import pytest

from qtarget.evaluation.metrics import default_ks, markdown_table, pass_at_k, summarize


@pytest.mark.parametrize("n", [1, 2, 5, 10, 16])
def test_pass_at_k_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_pass_at_k_is_probability_a_random_k_subset_has_a_correct_sample():
    n, c = 7, 3
    flags = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(flags, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows floats; the product form does not
    v = pass_at_k(1000, 1, 500)
    assert v == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(1000, 0, 10) == 0.0
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_bad_input():
    with pytest.raises(ValueError, match="k=5 is larger"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k >= 1"):
        pass_at_k(4, 1, 0)


def _rec(bench, pid, idx, correct, tokens=10, cut=False, ent=1.0):
    return {"benchmark": bench, "problem_id": pid, "sample_idx": idx, "correct": correct,
            "num_tokens": tokens, "cut": cut, "entropy": ent}


def test_summarize():
    recs = [
        _rec("a", "p1", 0, True, 10, False, 1.0), _rec("a", "p1", 1, False, 20, True, 3.0),
        _rec("a", "p2", 0, False, 30, True, None), _rec("a", "p2", 1, False, 40, False, 2.0),
        _rec("b", "q1", 0, True), _rec("b", "q1", 1, True),
    ]
    s = summarize(recs)
    a = s["benchmarks"]["a"]
    assert a["problems"] == 2 and a["samples"] == 4
    assert a["accuracy"] == pytest.approx(0.25)
    assert a["avg@2"] == pytest.approx(0.25)
    assert a["pass@1"] == pytest.approx(0.25)
    assert a["pass@2"] == pytest.approx(0.5)
    assert a["mean_response_tokens"] == pytest.approx(25.0)
    assert a["cut_rate"] == pytest.approx(0.5)
    assert a["mean_token_entropy"] == pytest.approx(2.0)  # None skipped
    assert s["overall"]["problems"] == 3
    assert s["overall"]["pass@2"] == pytest.approx((1 + 0 + 1) / 3)
    table = markdown_table(s)
    assert "| a | 2 | 4 | 25.0 | 25.0 | 25.0 | 50.0 |" in table
    assert table.count("\n") == 5  # header, rule, a, b, overall


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(6) == [1, 2, 4, 6]
