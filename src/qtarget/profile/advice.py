"""What a prior profile implies, with its evidence: findings kept as data, not prose.

The placement follows the model-capability continuum of Li et al., "Beyond Log Likelihood"
(arXiv 2510.00526; numbers read from its ICML 2026 version). The paper does not define cut-offs: it
measures the mean predicted probability of the training tokens under the base model (its Eq. 5, our
`mean_p_y`) for the settings it places on the continuum (Table 5): model-strong (math) 0.76–0.81,
model-intermediate (medical) 0.50–0.59, model-weak (figfont puzzles) 0.01–0.07. A profile is placed
inside one of these measured bands or, between two bands, says so: the paper has no setting there.

Every recommendation names its source (paper + table/figure) and, where the lab measured the claim,
the lab's computed verdict (docs/lab_example/v1_long/results.json, the 3-seed long preset on SmolLM2-135M;
tests/test_profile_advice.py checks these entries against that file so they cannot drift).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Sequence

PAPER = "arXiv 2510.00526 (Beyond Log Likelihood)"


@dataclass(frozen=True)
class Source:
    paper: str
    where: str  # table / figure / section
    says: str


@dataclass(frozen=True)
class LabVerdict:
    """A claim of the lab's long example (docs/lab_example/v1_long/results.json `claims`)."""

    statement: str
    row: str
    versus: str
    metric: str
    verdict: str
    effect: float  # row - versus, the point estimate
    lo: float
    hi: float

    def text(self) -> str:
        return f"{self.statement}: {self.verdict} ({self.effect:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}])"


@dataclass(frozen=True)
class Band:
    """A region of the continuum the paper measured: its mean-p_y range over the listed models."""

    regime: str  # strong / intermediate / weak
    lo: float
    hi: float
    domain: str
    source: Source


BANDS = (
    Band("weak", 0.01, 0.07, "figfont puzzles (no pretraining data)",
         Source(PAPER, "Table 5", "mean predicted probability 0.01, 0.01, 0.01, 0.07 (LLaMA-3.2-3B, LLaMA-3.1-8B, "
                                  "Qwen2.5-1.5B, Qwen2.5-7B) on figfont puzzles: the model-weak end")),
    Band("intermediate", 0.50, 0.59, "medical reasoning (partial priors)",
         Source(PAPER, "Table 5", "mean predicted probability 0.50, 0.53, 0.56, 0.59 (LLaMA-3.2-3B, LLaMA-3.1-8B, "
                                  "Qwen2.5-1.5B, Qwen2.5-Math-7B) on medical data: the intermediate region")),
    Band("strong", 0.76, 0.81, "math reasoning (strong priors)",
         Source(PAPER, "Table 5", "mean predicted probability 0.80, 0.76, 0.80, 0.81 (LLaMA-3.1-8B, DeepSeekMath-7B, "
                                  "Qwen2.5-Math-1.5B, Qwen2.5-Math-7B) on math: the model-strong end")),
)
# Table 6: share of training tokens with initial p_y > 0.55 on the model-strong end.
STRONG_SHARE_ABOVE_055 = (0.728, 0.812)
STRONG_SHARE_SOURCE = Source(PAPER, "Table 6", "72.8 %–81.2 % of training tokens have initial p_y > 0.55 for the "
                                               "four model-strong backbones")

# ------------------------------------------------------------------------------------------ lab
LAB = "qtarget lab long example (SmolLM2-135M, noisy arithmetic, 3 seeds)"
LAB_VERDICTS: dict[str, LabVerdict] = {
    "dft_gen": LabVerdict("DFT beats SFT in-domain", "dft", "sft", "gen_acc", "inconclusive",
                          -0.19833333333333333, -0.25333333333333335, -0.1466666666666667),
    "dft_noise": LabVerdict("DFT's γ = p_y fits corrupted tokens less than SFT", "dft", "sft", "noise_fit",
                            "supported", -2.412457742300195, -3.1074689407456146, -1.7489990900048735),
    "target_sft_noise": LabVerdict("Target-SFT's γ = p_y fits corrupted tokens less than SFT", "target_sft", "sft",
                                   "noise_fit", "supported", -1.861534368031189, -2.470278591081871,
                                   -1.2969964096832363),
    "target_sft_gen": LabVerdict("Target-SFT ≥ SFT in-domain (margin 0.02)", "target_sft", "sft", "gen_acc",
                                 "inconclusive", -0.028333333333333332, -0.065, 0.005),
    "psft_forgetting": LabVerdict("PSFT forgets less than SFT", "psft", "sft", "forgetting", "supported",
                                  -0.002664568000000014, -0.004785334000000031, -0.000660088999999981),
    "psft_gen": LabVerdict("PSFT is on par with SFT in-domain (±0.05)", "psft", "sft", "gen_acc", "inconclusive",
                           -0.021666666666666667, -0.06166666666666667, 0.015),
    "asft_forgetting": LabVerdict("ASFT's KL anchor forgets less than DFT", "asft", "dft", "forgetting", "supported",
                                  -0.03234575600000001, -0.03675657253333334, -0.027714369100000004),
}


# ------------------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """An objective worth trying first in some regimes, why, and the evidence."""

    objective: str  # registry name
    args: dict[str, Any]
    regimes: tuple[str, ...]  # strong / strong_intermediate / intermediate / weak_intermediate / weak
    reason: str
    sources: tuple[Source, ...]
    lab: tuple[str, ...] = ()  # keys of LAB_VERDICTS
    needs_teacher: bool = False
    lab_row: str | None = None  # the `qtarget lab` row that tests it (None: the lab cannot train it yet)

    @property
    def spec(self) -> str:
        if not self.args:
            return self.objective
        return f"{self.objective}(" + ", ".join(f"{k}={v}" for k, v in self.args.items()) + ")"


FINDINGS: tuple[Finding, ...] = (
    Finding("prob", {"alpha": 1.0}, ("strong", "strong_intermediate"),
            "−p down-weights low-probability tokens (prior-leaning); it beat NLL on every model-strong backbone",
            (Source(PAPER, "Table 1", "−p beats −log p on all four math backbones, e.g. Qwen2.5-Math-1.5B average "
                                      "32.75 vs 17.00"),
             Source(PAPER, "Table 8", "Qwen2.5-Coder-7B: −p 77.8 vs −log p 74.7 average pass@1 (EvalPlus)"),
             Source(PAPER, "Figure 7", "the −p gain over NLL grows with model size (Qwen2.5 3B→32B, math)")),
            lab_row="prob"),
    Finding("profit", {"tau": 0.2}, ("strong", "strong_intermediate"),
            "NLL that skips tokens the model gives p_y ≤ 0.2: the low-probability tokens hurt at the strong end",
            (Source(PAPER, "Table 1", "−log(p)·1{p ≥ 0.2} beats −log p on all four math backbones, e.g. "
                                      "Qwen2.5-Math-7B 38.16 vs 22.67"),
             Source(PAPER, "Figure 5", "training only on the top 10 % most likely tokens beats NLL on all tokens; "
                                       "the bottom 10 % account for most of NLL's loss (Qwen2.5-Math-1.5B)")),
            lab_row="profit"),
    Finding("dft", {}, ("strong", "strong_intermediate"),
            "γ = p_y: the same logit gradient as −p (SPEC §2), the form this library and its lab train",
            (Source("arXiv 2508.05629 (DFT)", "Sec. 3 / SPEC §3", "Qwen2.5-Math-1.5B average 31.58 vs SFT 18.01 "
                                                                  "on five math benchmarks"),),
            lab=("dft_gen", "dft_noise"), lab_row="dft"),
    Finding("target_sft", {"eta": 0.5}, ("strong", "strong_intermediate", "intermediate"),
            "γ = p_y like −p, with the rejected mass sent toward a teacher instead of the student's own guess",
            (Source("arXiv 2606.11189 (Target-SFT)", "SPEC §3", "best Average@16 in all ten settings (math and "
                                                                "medical) against SFT, the p-loss and distillation"),),
            lab=("target_sft_noise", "target_sft_gen"), needs_teacher=True, lab_row="target_sft"),
    Finding("sft", {}, ("intermediate", "weak_intermediate", "weak"),
            "NLL gives the strongest correction to low-probability tokens, which is what a weak prior needs",
            (Source(PAPER, "Table 3", "figfont puzzles: −log p exact match 35.20 vs 0.00 for −p (Qwen2.5-7B)"),
             Source(PAPER, "Table 9", "low-resource languages: NLL beats −p for every language and both "
                                      "backbones"),
             Source(PAPER, "Table 2", "medical (intermediate): −p and −log p within noise (e.g. LLaMA-3.1-8B "
                                      "average 45.89 vs 47.23)")),
            lab_row="sft"),
    Finding("prob", {"alpha": 1.0}, ("intermediate",),
            "in the intermediate region neither side wins: train both and compare on your data",
            (Source(PAPER, "Table 2", "medical: −p and −log p within noise on all four backbones"),
             Source(PAPER, "Table 7", "general instruction tuning: −p vs NLL win rate 41 % (3B), 50 % (7B), "
                                      "57 % (14B)")),
            lab_row="prob"),
    Finding("psft", {"eps": 0.28}, ("intermediate", "weak_intermediate"),
            "NLL-like updates with a trust-region clip: on par in-domain, less forgetting",
            (Source("arXiv 2508.17784 (PSFT)", "SPEC §3", "in-domain on par with SFT, better out-of-domain "
                                                          "(Qwen2.5-7B-Instruct OOD 61.26 vs 57.90)"),),
            lab=("psft_forgetting", "psft_gen"), lab_row="psft"),
)
BASELINE = "sft"  # always trained by the lab as the reference
PROFIT_LAB_TAU = 0.1  # catalog.ProFit's default, what `qtarget lab --objectives profit` trains


# ------------------------------------------------------------------------------------ placement
@dataclass
class Placement:
    regime: str  # strong / strong_intermediate / intermediate / weak_intermediate / weak
    text: str
    sources: list[Source] = field(default_factory=list)


REGIME_TEXT = {
    "strong": "model-strong end: prior-leaning objectives (−p, thresholded NLL, γ = p_y) tend to beat NLL",
    "strong_intermediate": "between the intermediate region and the model-strong end (the paper measured no "
                           "setting here): lean toward prior-leaning objectives, keep NLL as the baseline",
    "intermediate": "intermediate region: no single objective wins; compare NLL and −p on your data",
    "weak_intermediate": "between the model-weak end and the intermediate region (the paper measured no setting "
                         "here): lean toward NLL",
    "weak": "model-weak end: NLL tends to win; prior-leaning objectives can fail outright",
}


def place(mean_p_y: float) -> Placement:
    """Where a profile's mean p_y falls relative to the bands of Table 5."""
    if not 0.0 <= mean_p_y <= 1.0:
        raise ValueError(f"mean_p_y must be in [0, 1], got {mean_p_y}")
    weak, mid, strong = BANDS
    if mean_p_y >= strong.lo:
        regime, near = "strong", [strong]
    elif mean_p_y > mid.hi:
        regime, near = "strong_intermediate", [mid, strong]
    elif mean_p_y >= mid.lo:
        regime, near = "intermediate", [mid]
    elif mean_p_y > weak.hi:
        regime, near = "weak_intermediate", [weak, mid]
    else:
        regime, near = "weak", [weak]
    bands = "; ".join(f"{b.regime} {b.lo:.2f}–{b.hi:.2f} ({b.domain})" for b in near)
    text = f"mean p_y {mean_p_y:.3f} → {REGIME_TEXT[regime]} [paper bands: {bands}]"
    return Placement(regime, text, [b.source for b in near])


# ------------------------------------------------------------------------------------ advice
@dataclass
class Advice:
    placement: Placement
    recommendations: list[Finding]
    notes: list[str]
    lab_objectives: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "regime": self.placement.regime,
            "placement": self.placement.text,
            "placement_sources": [vars(s) for s in self.placement.sources],
            "recommendations": [{"objective": f.spec, "reason": f.reason,
                                 "sources": [vars(s) for s in f.sources],
                                 "lab": [LAB_VERDICTS[k].text() for k in f.lab] or ["not measured by the lab"],
                                 "needs_teacher": f.needs_teacher} for f in self.recommendations],
            "notes": self.notes,
            "lab_objectives": self.lab_objectives,
            "caveat": CAVEAT,
        }


CAVEAT = ("This is a prior to test, not a result: the paper's bands come from 1.5B–8B base models on math, "
          "medical and puzzle data; your model, data and budget may behave differently. Run the lab command "
          "below to measure it.")


def advise(summary: dict[str, Any], *, has_teacher: bool = False) -> Advice:
    """Recommendations for a profile summary (needs mean_p_y and share_p_y_above_0.55; uses
    share_p_y_below_0.1 and, with a teacher, the teacher block)."""
    placement = place(float(summary["mean_p_y"]))
    recs = [f for f in FINDINGS if placement.regime in f.regimes and (has_teacher or not f.needs_teacher)]
    notes: list[str] = []
    share055 = summary.get("share_p_y_above_0.55")
    if share055 is not None:
        lo, hi = STRONG_SHARE_ABOVE_055
        rel = "within" if lo <= share055 <= hi else "above" if share055 > hi else "below"
        notes.append(f"{share055:.1%} of tokens have p_y > 0.55, {rel} the model-strong range {lo:.1%}–{hi:.1%} "
                     f"({STRONG_SHARE_SOURCE.paper}, {STRONG_SHARE_SOURCE.where})")
    low = summary.get("share_p_y_below_0.1")
    if low is not None and placement.regime in ("strong", "strong_intermediate") and low >= 0.1:
        notes.append(f"{low:.1%} of tokens have p_y < 0.1 despite a strong prior: candidates for noise or "
                     f"non-unique wording; at the strong end such tokens hurt NLL ({PAPER}, Figure 5) — "
                     f"thresholded NLL (profit) or γ = p_y objectives skip them; inspect the rows listed as most "
                     f"off-prior")
    teacher = summary.get("teacher")
    if teacher:
        gain = teacher["mean_p_y"] - summary["mean_p_y"]
        notes.append(f"the teacher's mean p_y is {teacher['mean_p_y']:.3f} ({gain:+.3f} vs the student); it "
                     f"agrees with the student's top-1 on {teacher['teacher_student_agreement']:.1%} of tokens"
                     + ("; a teacher that knows the data better than the student is what target_sft's residual "
                        "uses (arXiv 2606.11189)" if gain > 0 else
                        "; a teacher no better than the student adds little to target_sft"))
    lab_objs = [BASELINE]
    for f in recs:
        if f.lab_row and f.lab_row not in lab_objs:
            lab_objs.append(f.lab_row)
    if "profit" in lab_objs:
        notes.append(f"the lab trains profit with its registry default τ = {PROFIT_LAB_TAU}; the paper's thresholded "
                     f"NLL used p ≥ 0.2 ({PAPER}, Table 1)")
    return Advice(placement, recs, notes, lab_objs)


def lab_command(model: str, dataset: str, objectives: Sequence[str], *, teacher: str | None = None,
                extra: Sequence[str] = ()) -> str:
    """The exact `qtarget lab` command that tests the advice on the user's model and data (the lab trains
    target_sft's teacher itself unless `teacher` is given)."""
    parts = ["qtarget", "lab", "--model", model, "--dataset", dataset, "--objectives", ",".join(objectives)]
    if teacher and "target_sft" in objectives:
        parts += ["--teacher", teacher]
    parts += list(extra)
    return shlex.join(parts)
