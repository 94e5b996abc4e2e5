"""What a profile implies: placement on the continuum of arXiv 2510.00526 and the objectives to try
first, on planted profiles (all-high p_y, all-low, mixed), with the sources each one cites; the lab
verdicts kept in advice.py against the lab's own results.json."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from qtarget.objectives.registry import get_objective
from qtarget.profile.advice import (
    BANDS,
    FINDINGS,
    LAB_VERDICTS,
    PAPER,
    PROFIT_LAB_TAU,
    advise,
    lab_command,
    place,
)
from qtarget.profile.compute import TokenProfile
from qtarget.profile.summary import summarize

LAB_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "lab_example" / "v1_long" / "results.json"


def planted_summary(p_y: np.ndarray, teacher_p_y: np.ndarray | None = None) -> dict:
    """A summary of a planted profile: 4 rows of len(p_y) / 4 tokens, top-1 = (p_y > 0.5)."""
    n = p_y.size
    teacher = {}
    if teacher_p_y is not None:
        teacher = {"p_y": teacher_p_y, "logp_y": np.log(teacher_p_y), "entropy": np.ones(n), "top1": teacher_p_y > 0.5,
                   "agree": (teacher_p_y > 0.5) == (p_y > 0.5), "kl": np.zeros(n)}
    prof = TokenProfile(row=np.repeat(np.arange(4), n // 4), position=np.tile(np.arange(n // 4), 4),
                        label=np.zeros(n, dtype=np.int64), p_y=p_y, logp_y=np.log(p_y), entropy=np.ones(n),
                        top1=p_y > 0.5, teacher=teacher)
    return summarize(prof)


def rng_beta(a: float, b: float, n: int = 400) -> np.ndarray:
    return np.clip(np.random.default_rng(0).beta(a, b, n), 1e-6, 1 - 1e-6)


def objectives(advice) -> list[str]:
    return [f.objective for f in advice.recommendations]


def cites(advice, objective: str) -> set[str]:
    return {s.where for f in advice.recommendations if f.objective == objective for s in f.sources}


def test_all_high_p_y_is_model_strong_and_recommends_prior_leaning():
    s = planted_summary(rng_beta(12, 1.5))
    assert s["mean_p_y"] > 0.81
    advice = advise(s)
    assert advice.placement.regime == "strong"
    assert [src.where for src in advice.placement.sources] == ["Table 5"]
    recs = objectives(advice)
    assert recs[:3] == ["prob", "profit", "dft"] and "sft" not in recs
    assert {"Table 1", "Table 8", "Figure 7"} <= cites(advice, "prob")
    assert {"Table 1", "Figure 5"} <= cites(advice, "profit")
    assert all(src.paper == PAPER for f in advice.recommendations if f.objective in ("prob", "profit")
               for src in f.sources)
    # the lab's verdicts travel with dft; sft stays the lab's baseline; −p is trained as dft
    d = advice.to_dict()
    dft = next(r for r in d["recommendations"] if r["objective"] == "dft")
    assert any("inconclusive" in t for t in dft["lab"]) and any("supported" in t for t in dft["lab"])
    assert advice.lab_objectives == ["sft", "prob", "profit", "dft"]
    assert "not a result" in d["caveat"]
    assert any("Table 6" in n for n in advice.notes)


def test_all_low_p_y_is_model_weak_and_recommends_nll():
    advice = advise(planted_summary(rng_beta(0.3, 12)))
    assert advice.placement.regime == "weak"
    assert objectives(advice) == ["sft"]
    assert {"Table 3", "Table 9"} <= cites(advice, "sft")
    assert advice.lab_objectives == ["sft"]


def test_mixed_p_y_is_intermediate_and_names_no_single_winner():
    p = np.concatenate([rng_beta(8, 1.5, 200), rng_beta(1, 4, 200)])  # bimodal: half known, half not
    s = planted_summary(p)
    assert 0.5 <= s["mean_p_y"] <= 0.59
    advice = advise(s)
    assert advice.placement.regime == "intermediate"
    recs = objectives(advice)
    assert "sft" in recs and "prob" in recs and "psft" in recs
    assert "Table 2" in cites(advice, "sft") and "Table 2" in cites(advice, "prob")
    assert "no single objective wins" in advice.placement.text


@pytest.mark.parametrize("mean, regime", [(0.0, "weak"), (0.07, "weak"), (0.0700001, "weak_intermediate"),
                                          (0.3, "weak_intermediate"), (0.5, "intermediate"), (0.59, "intermediate"),
                                          (0.65, "strong_intermediate"), (0.76, "strong"), (1.0, "strong")])
def test_placement_follows_the_measured_bands(mean, regime):
    assert place(mean).regime == regime
    # between two bands both are cited; inside one, that one
    assert len(place(mean).sources) == (2 if "_" in regime else 1)


def test_placement_rejects_a_non_probability():
    with pytest.raises(ValueError, match="mean_p_y must be in"):
        place(1.2)


def test_teacher_recommends_target_sft_only_with_a_teacher():
    p = rng_beta(12, 1.5)
    assert "target_sft" not in objectives(advise(planted_summary(p)))
    s = planted_summary(p, teacher_p_y=np.clip(p + 0.05, 0, 1 - 1e-6))
    advice = advise(s, has_teacher=True)
    assert "target_sft" in objectives(advice) and "target_sft" in advice.lab_objectives
    assert any("target_sft's residual" in n for n in advice.notes)


def test_noisy_tokens_under_a_strong_prior_are_flagged():
    p = np.concatenate([np.full(300, 0.97), np.full(100, 0.02)])  # mean 0.73: leaning strong, 25 % very unlikely
    advice = advise(planted_summary(p))
    assert advice.placement.regime == "strong_intermediate"
    assert any("Figure 5" in n for n in advice.notes)


def test_every_finding_names_a_registered_objective_and_sources():
    assert get_objective("profit").params["tau"] == PROFIT_LAB_TAU  # what the lab trains, as the note says
    for f in FINDINGS:
        get_objective(f.objective, **f.args)  # a real objective with valid arguments
        assert f.sources and all(s.paper and s.where and s.says for s in f.sources)
        assert all(k in LAB_VERDICTS for k in f.lab)
    assert [b.regime for b in BANDS] == ["weak", "intermediate", "strong"]


def test_lab_verdicts_match_the_lab_results():
    claims = json.loads(LAB_RESULTS.read_text())["claims"]
    by_statement = {c["statement"]: c for c in claims}
    for v in LAB_VERDICTS.values():
        c = by_statement[v.statement]
        assert (c["row"], c["versus"], c["metric"], c["verdict"]) == (v.row, v.versus, v.metric, v.verdict)
        assert (c["effect"]["value"], c["effect"]["lo"], c["effect"]["hi"]) == pytest.approx((v.effect, v.lo, v.hi))


def test_lab_command_is_exact_and_quoted():
    cmd = lab_command("my model", "data.jsonl", ["sft", "target_sft"], teacher="t dir")
    assert shlex.split(cmd) == ["qtarget", "lab", "--model", "my model", "--dataset", "data.jsonl", "--objectives",
                                "sft,target_sft", "--teacher", "t dir"]
    # the teacher is only passed where an objective reads it
    assert "--teacher" not in lab_command("m", "d", ["sft", "dft"], teacher="t")
