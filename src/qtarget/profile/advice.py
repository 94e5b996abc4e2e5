"""What a prior profile implies, with its evidence: findings kept as data, not prose.

The placement follows the model-capability continuum of Li et al., "Beyond Log Likelihood"
(arXiv 2510.00526; numbers read from its ICML 2026 version). The paper does not define cut-offs: it
measures the mean predicted probability of the training tokens under the base model (its Eq. 5, our
`mean_p_y`) for the settings it places on the continuum (Table 5): model-strong (math) 0.76–0.81,
model-intermediate (medical) 0.50–0.59, model-weak (figfont puzzles) 0.01–0.07. A profile is placed
inside one of these measured bands or, between two bands, says so: the paper has no setting there.

Every recommendation names its sources (paper + table/figure + the model sizes it was measured at) and the
lab's own computed verdicts on the matching claims (LAB_VERDICTS: docs/lab_example/long/results.json, the
default lab over 3 seeds on SmolLM2-135M; tests/test_profile_advice.py checks every entry against that file
so they cannot drift). The ranking follows the evidence: the user's own lab results first (profile
--lab_results, `lab_results.py`), then the lab's verdicts (a finding the lab contradicts at its scale is
ranked after the others and says so), then the paper's order.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from qtarget.lab.analysis import METRIC_BY_KEY
from qtarget.lab.row_args import format_value

if TYPE_CHECKING:
    from qtarget.profile.lab_results import LabOutcome

PAPER = "arXiv 2510.00526 (Beyond Log Likelihood)"
PAPER_SCALE = "1.5B–8B"  # the base models behind the paper's bands (Table 5) and most of its tables


@dataclass(frozen=True)
class Source:
    paper: str
    where: str  # table / figure / section
    says: str
    scale: str  # the models (and so the sizes) the finding was measured on

    def text(self) -> str:
        return f"{self.paper}, {self.where} [{self.scale}]: {self.says}"


@dataclass(frozen=True)
class LabVerdict:
    """A claim of the lab's committed example (LAB_RUN's results.json, `per_task[task]["claims"]`)."""

    statement: str
    task: str
    prior: str  # the task's prior class in that run (strong / weak)
    row: str
    versus: str
    metric: str
    verdict: str
    effect: float  # row - versus, the point estimate
    lo: float
    hi: float
    note: str = ""

    def text(self) -> str:
        return (f"{self.statement} [task {self.task}, {self.prior} prior]: {self.verdict} ({self.effect:+.3f} "
                f"[{self.lo:+.3f}, {self.hi:+.3f}]" + (f"; {self.note}" if self.note else "") + ")")


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
         Source(PAPER, "Table 5", "mean predicted probability 0.01, 0.01, 0.01, 0.07 on figfont puzzles: the "
                                  "model-weak end", "LLaMA-3.2-3B, LLaMA-3.1-8B, Qwen2.5-1.5B, Qwen2.5-7B")),
    Band("intermediate", 0.50, 0.59, "medical reasoning (partial priors)",
         Source(PAPER, "Table 5", "mean predicted probability 0.50, 0.53, 0.56, 0.59 on medical data: the "
                                  "intermediate region", "LLaMA-3.2-3B, LLaMA-3.1-8B, Qwen2.5-1.5B, Qwen2.5-Math-7B")),
    Band("strong", 0.76, 0.81, "math reasoning (strong priors)",
         Source(PAPER, "Table 5", "mean predicted probability 0.80, 0.76, 0.80, 0.81 on math: the model-strong end",
                "LLaMA-3.1-8B, DeepSeekMath-7B, Qwen2.5-Math-1.5B, Qwen2.5-Math-7B")),
)
# Table 6: share of training tokens with initial p_y > 0.55 on the model-strong end.
STRONG_SHARE_ABOVE_055 = (0.728, 0.812)
STRONG_SHARE_SOURCE = Source(PAPER, "Table 6", "72.8 %–81.2 % of training tokens have initial p_y > 0.55 for the "
                                               "four model-strong backbones", "1.5B–8B (the Table 5 math models)")

# ------------------------------------------------------------------------------------------ lab
LAB_RUN = "docs/lab_example/long"
LAB = "the lab's committed --long example (SmolLM2-135M-Instruct, 3 seeds × 48 steps, tasks glyph and sum)"
LAB_SCALE = "135M"
LAB_VERDICTS: dict[str, LabVerdict] = {
    "sum.dft_gen": LabVerdict("strong prior: DFT ≥ SFT in-domain (margin 0.02)", "sum", "strong", "dft", "sft",
                              "gen_acc", "contradicted", -0.12777777777777777, -0.2333333333333333,
                              -0.022222222222222223),
    "sum.dft_nll": LabVerdict("strong prior: DFT ≥ SFT on held-out NLL (margin 0.02 nats)", "sum", "strong", "sft",
                              "dft", "heldout_nll", "contradicted", -0.4010906666666667, -0.6273191614583331,
                              -0.2197863882812501),
    "sum.dft_noise": LabVerdict("DFT's γ = p_y fits corrupted tokens less than SFT", "sum", "strong", "dft", "sft",
                                "noise_fit", "supported", -3.0693840459770114, -4.5632845544132765,
                                -1.1254574456296125),
    "sum.target_sft_margin": LabVerdict("strong prior: Target-SFT ≥ SFT on the ranking margin", "sum", "strong",
                                        "target_sft", "sft", "rank_margin", "supported", 2.2938394270833333,
                                        1.5608861582031246, 3.0658555835937498),
    "sum.target_sft_noise": LabVerdict("Target-SFT's γ = p_y fits corrupted tokens less than SFT", "sum", "strong",
                                       "target_sft", "sft", "noise_fit", "supported", -3.0974462658260418,
                                       -3.803878414086893, -2.4161439124421014),
    "sum.target_sft_gen": LabVerdict("Target-SFT ≥ SFT in-domain (margin 0.02)", "sum", "strong", "target_sft", "sft",
                                     "gen_acc", "inconclusive", -0.022222222222222223, -0.13888888888888887,
                                     0.1111111111111111),
    "sum.psft_forgetting": LabVerdict("PSFT forgets less than SFT", "sum", "strong", "psft", "sft", "forgetting",
                                      "contradicted", 0.04775457638888885, 0.03815897986111108, 0.05876945746527776),
    "sum.psft_gen": LabVerdict("PSFT is on par with SFT in-domain (±0.05)", "sum", "strong", "psft", "sft", "gen_acc",
                               "inconclusive", -0.011111111111111112, -0.08333333333333333, 0.05569444444444369),
    "sum.psft_entropy": LabVerdict("PSFT avoids entropy collapse: more held-out entropy than SFT", "sum", "strong",
                                   "psft", "sft", "entropy", "contradicted", -0.013510395833333334, -0.02689064765625,
                                   -0.0002535359375000019),
    "glyph.sft_gen": LabVerdict("weak prior: SFT ≥ DFT in-domain (margin 0.02)", "glyph", "weak", "sft", "dft",
                                "gen_acc", "inconclusive", 0.2777777777777778, 0.17777777777777778,
                                0.39444444444444443, "most answers of dft are malformed"),
    "glyph.sft_nll": LabVerdict("weak prior: SFT ≥ DFT on held-out NLL (margin 0.02 nats)", "glyph", "weak", "dft",
                                "sft", "heldout_nll", "supported", 1.2182749270833333, 1.0318388673177086,
                                1.409124282161458),
    "glyph.psft_forgetting": LabVerdict("PSFT forgets less than SFT", "glyph", "weak", "psft", "sft", "forgetting",
                                        "supported", -0.02626778472222223, -0.04187412517361113,
                                        -0.010673839583333362),
    "glyph.psft_gen": LabVerdict("PSFT is on par with SFT in-domain (±0.05)", "glyph", "weak", "psft", "sft",
                                 "gen_acc", "inconclusive", 0.0, -0.06111111111111111, 0.061111111111111116),
    "glyph.psft_entropy": LabVerdict("PSFT avoids entropy collapse: more held-out entropy than SFT", "glyph", "weak",
                                     "psft", "sft", "entropy", "contradicted", -0.011497713541666668,
                                     -0.01614448658854166, -0.006870676953125001),
}


# ------------------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """An objective worth trying first in some regimes, why, and the evidence: the papers' sources and the
    lab's claims on it (`lab`: a *supported* verdict favours the finding, *contradicted* goes against it;
    `lab_opposed`: claims that state the opposite, so the other way round)."""

    objective: str  # registry name
    args: dict[str, Any]
    regimes: tuple[str, ...]  # strong / strong_intermediate / intermediate / weak_intermediate / weak
    reason: str
    sources: tuple[Source, ...]
    lab: tuple[str, ...] = ()  # keys of LAB_VERDICTS
    lab_opposed: tuple[str, ...] = ()
    lab_how: str = ""  # how the lab's claims bear on this objective when they name another row
    needs_teacher: bool = False
    lab_row: str | None = None  # the `qtarget lab` row that tests it (None: the lab cannot train it yet)

    @property
    def spec(self) -> str:
        if not self.args:
            return self.objective
        return f"{self.objective}(" + ", ".join(f"{k}={v}" for k, v in self.args.items()) + ")"


MATH4 = "LLaMA-3.1-8B, DeepSeekMath-7B, Qwen2.5-Math-1.5B, Qwen2.5-Math-7B"
STRONG_CLAIMS = ("sum.dft_gen", "sum.dft_nll")  # the continuum's strong-end claims, as the lab measures them
FINDINGS: tuple[Finding, ...] = (
    Finding("prob", {"alpha": 1.0}, ("strong", "strong_intermediate"),
            "−p down-weights low-probability tokens (prior-leaning); it beat NLL on every model-strong backbone",
            (Source(PAPER, "Table 1", "−p beats −log p on all four math backbones, e.g. Qwen2.5-Math-1.5B average "
                                      "32.75 vs 17.00", MATH4),
             Source(PAPER, "Table 8", "−p 77.8 vs −log p 74.7 average pass@1 (EvalPlus)", "Qwen2.5-Coder-7B"),
             Source(PAPER, "Figure 7", "the −p gain over NLL grows with model size (math)", "Qwen2.5 3B to 32B")),
            lab=STRONG_CLAIMS + ("sum.dft_noise",),
            lab_how="the lab trains γ = p_y (dft), the same logit gradient as −p (SPEC §2)", lab_row="prob"),
    Finding("profit", {"tau": 0.2}, ("strong", "strong_intermediate"),
            "NLL that skips tokens the model gives p_y < 0.2: the low-probability tokens hurt at the strong end",
            (Source(PAPER, "Table 1", "−log(p)·1{p ≥ 0.2} beats −log p on all four math backbones, e.g. "
                                      "Qwen2.5-Math-7B 38.16 vs 22.67", MATH4),
             Source(PAPER, "Figure 5", "training only on the top 10 % most likely tokens beats NLL on all tokens; "
                                       "the bottom 10 % account for most of NLL's loss", "Qwen2.5-Math-1.5B")),
            lab=STRONG_CLAIMS,
            lab_how="the lab tests the paper's claim for the prior-leaning family (Table 1: −p and thresholded NLL) "
                    "with dft", lab_row="profit"),
    Finding("dft", {}, ("strong", "strong_intermediate"),
            "γ = p_y: the same logit gradient as −p (SPEC §2), the form this library and its lab train",
            (Source("arXiv 2508.05629 (DFT)", "Sec. 3 / SPEC §3", "Qwen2.5-Math-1.5B average 31.58 vs SFT 18.01 "
                                                                  "on five math benchmarks",
                    "Qwen2.5-Math-1.5B, Qwen2.5-Math-7B, Llama-3.1-8B"),),
            lab=STRONG_CLAIMS + ("sum.dft_noise",), lab_row="dft"),
    Finding("target_sft", {"eta": 0.5}, ("strong", "strong_intermediate", "intermediate"),
            "γ = p_y like −p, with the rejected mass sent toward a teacher instead of the student's own guess",
            (Source("arXiv 2606.11189 (Target-SFT)", "SPEC §3", "best Average@16 in all ten settings (math and "
                                                                "medical) against SFT, the p-loss and distillation",
                    "Qwen3-1.7B, Qwen2.5-Math-1.5B/7B, Llama-3.2-3B, Llama-3.1-8B, Qwen2.5-1.5B/7B"),),
            lab=("sum.target_sft_gen", "sum.target_sft_margin", "sum.target_sft_noise"), needs_teacher=True,
            lab_row="target_sft"),
    Finding("sft", {}, ("strong", "strong_intermediate"),
            "NLL, the lab's baseline: the paper's prior-leaning gain shrinks with model size, so a small model may "
            "stay better off with NLL; the lab's verdicts at its scale decide this rank",
            (Source(PAPER, "Figure 7", "the −p gain over NLL grows with model size (math): smallest at the "
                                       "smallest model", "Qwen2.5 3B to 32B"),
             Source(PAPER, "Table 7", "general instruction tuning: −p vs NLL win rate 41 % (3B), 50 % (7B), 57 % "
                                      "(14B): NLL ahead at the smallest size", "3B, 7B, 14B")),
            lab_opposed=STRONG_CLAIMS, lab_row="sft"),
    Finding("sft", {}, ("intermediate", "weak_intermediate", "weak"),
            "NLL gives the strongest correction to low-probability tokens, which is what a weak prior needs",
            (Source(PAPER, "Table 3", "figfont puzzles: −log p exact match 35.20 vs 0.00 for −p", "Qwen2.5-7B"),
             Source(PAPER, "Table 9", "low-resource languages: NLL beats −p for every language and both backbones",
                    "two base models (sizes not recorded here)"),
             Source(PAPER, "Table 2", "medical (intermediate): −p and −log p within noise (e.g. LLaMA-3.1-8B "
                                      "average 45.89 vs 47.23)", "LLaMA-3.2-3B, LLaMA-3.1-8B, Qwen2.5-1.5B, "
                                                                 "Qwen2.5-Math-7B")),
            lab=("glyph.sft_gen", "glyph.sft_nll"), lab_row="sft"),
    Finding("prob", {"alpha": 1.0}, ("intermediate",),
            "in the intermediate region neither side wins: train both and compare on your data",
            (Source(PAPER, "Table 2", "medical: −p and −log p within noise on all four backbones",
                    "LLaMA-3.2-3B, LLaMA-3.1-8B, Qwen2.5-1.5B, Qwen2.5-Math-7B"),
             Source(PAPER, "Table 7", "general instruction tuning: −p vs NLL win rate 41 % (3B), 50 % (7B), "
                                      "57 % (14B)", "3B, 7B, 14B")),
            lab_row="prob"),
    Finding("psft", {"eps": 0.28}, ("intermediate", "weak_intermediate"),
            "NLL-like updates with a trust-region clip: on par in-domain, less forgetting",
            (Source("arXiv 2508.17784 (PSFT)", "SPEC §3", "in-domain on par with SFT, better out-of-domain "
                                                          "(OOD 61.26 vs 57.90), no entropy collapse",
                    "Qwen2.5-7B-Instruct"),),
            lab=("glyph.psft_forgetting", "sum.psft_forgetting", "glyph.psft_gen", "sum.psft_gen",
                 "glyph.psft_entropy", "sum.psft_entropy"), lab_row="psft"),
)
BASELINE = "sft"  # always trained by the lab as the reference


# ------------------------------------------------------------------------------------ evidence
@dataclass(frozen=True)
class Evidence:
    """One lab claim as it bears on a finding: `favours` True (for it), False (against it), None (no verdict)."""

    verdict: LabVerdict
    favours: bool | None

    def text(self) -> str:
        side = {True: "for", False: "against", None: "no verdict"}[self.favours]
        return f"{self.verdict.text()} → {side}"


LAB_STATUS = ("borne out", "inconclusive", "not measured", "contradicted")  # the ranking's order


def lab_evidence(f: Finding) -> list[Evidence]:
    out = []
    for keys, when_supported in ((f.lab, True), (f.lab_opposed, False)):
        for k in keys:
            v = LAB_VERDICTS[k]
            favours = None if v.verdict == "inconclusive" else (v.verdict == "supported") == when_supported
            out.append(Evidence(v, favours))
    return out


def lab_status(evidence: Sequence[Evidence]) -> str:
    """contradicted when any claim goes against the finding; borne out when one is for it and none against;
    inconclusive when every claim is; not measured without claims."""
    if not evidence:
        return "not measured"
    if any(e.favours is False for e in evidence):
        return "contradicted"
    return "borne out" if any(e.favours for e in evidence) else "inconclusive"


@dataclass
class Recommendation:
    """A finding in the ranked list, with the evidence that placed it there."""

    finding: Finding
    lab: list[Evidence]
    status: str  # LAB_STATUS
    yours: list[str] = field(default_factory=list)  # what the user's own lab run measured for it
    your_tier: int = 1  # 0: won (or is not separated from the winner) on the user's data, 2: lost there
    ranked: str = ""  # why it sits where it does, when the evidence moved it

    @property
    def objective(self) -> str:
        return self.finding.objective

    @property
    def spec(self) -> str:
        return self.finding.spec

    def to_dict(self) -> dict[str, Any]:
        f = self.finding
        return {"objective": f.spec, "name": f.objective, "args": dict(f.args), "reason": f.reason,
                "sources": [vars(s) for s in f.sources], "lab_status": self.status, "lab_how": f.lab_how,
                "lab": [e.text() for e in self.lab] or [f"not measured by {LAB}"],
                "your_lab": self.yours, "ranked": self.ranked, "needs_teacher": f.needs_teacher,
                "lab_row": f.lab_row}


def size_range(sources: Sequence[Source]) -> str:
    """The model sizes the sources were measured at, as one range ("1.5B–32B")."""
    sizes = sorted({float(x) for src in sources for x in re.findall(r"(\d+(?:\.\d+)?)B\b", src.scale)})
    if not sizes:
        return "unknown-size"
    return f"{sizes[0]:g}B" if len(sizes) == 1 else f"{sizes[0]:g}B–{sizes[-1]:g}B"


def rank(recs: list[Recommendation]) -> list[Recommendation]:
    """The user's own lab results first (winners, then unmeasured, then losers), then the lab's status (a
    finding the lab contradicts after the others), then the paper's order; each moved entry says why."""
    ranked = sorted(recs, key=lambda r: (r.your_tier, LAB_STATUS.index(r.status)))  # stable: paper order
    for r in ranked:
        if r.your_tier == 2:
            r.ranked = "ranked lower: it lost to the winner on your own lab results"
        elif r.status == "contradicted":
            against = "; ".join(e.verdict.statement + f" [{e.verdict.task}]" for e in r.lab if e.favours is False)
            r.ranked = (f"ranked lower: the lab contradicts the paper at {LAB_SCALE} (the paper measured "
                        f"{size_range(r.finding.sources)} models): {against}")
    return ranked


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
    recommendations: list[Recommendation]  # ranked
    notes: list[str]
    lab_objectives: list[str]  # the rows of the lab command: sft, then each recommendation's row
    lab_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # row -> the parameters the advice names
    your_lab: list[str] = field(default_factory=list)  # which objective won in the user's own lab run

    def to_dict(self) -> dict[str, Any]:
        return {
            "regime": self.placement.regime,
            "placement": self.placement.text,
            "placement_sources": [vars(s) for s in self.placement.sources],
            "recommendations": [r.to_dict() for r in self.recommendations],
            "ranking": RANKING,
            "notes": self.notes,
            "lab_objectives": self.lab_objectives,
            "lab_args": self.lab_args,
            "your_lab": self.your_lab,
            "lab_evidence": f"{LAB} ({LAB_RUN})",
            "caveat": CAVEAT,
        }


CAVEAT = ("This is a prior to test, not a result: the paper's bands come from 1.5B–8B base models on math, "
          "medical and puzzle data; your model, data and budget may behave differently. Run the lab command "
          "below to measure it.")
RANKING = (f"ranked by your own lab results (--lab_results) where given, then by the lab's verdicts at "
           f"{LAB_SCALE} (a finding the lab contradicts comes after the others), then in the paper's order")


def advise(summary: dict[str, Any], *, has_teacher: bool = False, lab_results: LabOutcome | None = None) -> Advice:
    """Recommendations for a profile summary (needs mean_p_y and share_p_y_above_0.55; uses
    share_p_y_below_0.1 and, with a teacher, the teacher block), ranked by the evidence: `lab_results`
    (the user's own lab run, `lab_results.read_lab_results`), then the lab's committed verdicts."""
    placement = place(float(summary["mean_p_y"]))
    findings = [f for f in FINDINGS if placement.regime in f.regimes and (has_teacher or not f.needs_teacher)]
    recs = [Recommendation(f, ev, lab_status(ev)) for f in findings for ev in [lab_evidence(f)]]
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
    your_lab: list[str] = []
    if lab_results is not None:
        your_lab = apply_lab_results(recs, lab_results)
    recs = rank(recs)
    lab_objs, lab_args = lab_rows(recs)
    return Advice(placement, recs, notes, lab_objs, lab_args, your_lab)


def apply_lab_results(recs: list[Recommendation], outcome: LabOutcome) -> list[str]:
    """Each recommendation's measured difference from sft in the user's lab run, and its tier there (on the
    first task's first decision metric: 0 = the winner or not separated from it, 2 = behind it beyond its
    interval). Returns the lines that say which objective won, per task and metric."""
    lines = outcome.lines() or [f"{outcome.source}: no decision metric with two trained rows"]
    first = outcome.tasks[0] if outcome.tasks else None
    for r in recs:
        for t in outcome.tasks:
            row = t.row_for(r.finding.objective, r.finding.args)
            if row is None:
                continue
            if row == t.reference:
                r.yours.append(f"task {t.task}: trained as row {row}, the reference")
            for metric, d in t.vs_reference.get(row, {}).items():
                if metric in {w["metric"] for w in t.winners}:
                    m = METRIC_BY_KEY[metric]
                    r.yours.append(f"task {t.task}: {m.title}, {row} − {t.reference}: {d['value']:+.{m.decimals}f} "
                                   f"[{d['lo']:+.{m.decimals}f}, {d['hi']:+.{m.decimals}f}]")
            w = t.primary()
            if t is first and w is not None:
                won = row == w["row"] or row in w["tied"]
                r.your_tier = 0 if won else 2
                r.yours.append(f"task {t.task}, {METRIC_BY_KEY[w['metric']].title}: "
                               + ("won" if row == w["row"] else "not separated from the winner " + w["row"] if won
                                  else f"behind the winner {w['row']} beyond its interval"))
            break
        if not r.yours and r.finding.lab_row:
            r.yours.append(f"not trained in {outcome.source}")
    return lines


def lab_rows(recs: Sequence[Recommendation]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The lab rows that test the recommendations (sft first, the reference) and the parameters each one
    names. Two recommendations that name one row with different parameters are a bug in FINDINGS."""
    rows, args = [BASELINE], {BASELINE: {}}
    for r in recs:
        f = r.finding
        if not f.lab_row:
            continue
        if f.lab_row in args and args[f.lab_row] != f.args:
            raise ValueError(f"advice: row {f.lab_row} named with {args[f.lab_row]} and {f.args}")
        if f.lab_row not in rows:
            rows.append(f.lab_row)
        args[f.lab_row] = dict(f.args)
    return rows, {k: v for k, v in args.items() if v}


def lab_command(model: str, dataset: str, objectives: Sequence[str], *, teacher: str | None = None,
                objective_args: dict[str, dict[str, Any]] | None = None, extra: Sequence[str] = ()) -> str:
    """The exact `qtarget lab` command that trains the rows and parameters the advice names on the user's
    model and data (`--objective_args ROW.PARAM=V,...`; the lab trains target_sft's teacher itself unless
    `teacher` is given)."""
    parts = ["qtarget", "lab", "--model", model, "--dataset", dataset, "--objectives", ",".join(objectives)]
    given = [f"{row}.{k}={format_value(v)}" for row in objectives for k, v in (objective_args or {}).get(row, {}).items()]
    if given:
        parts += ["--objective_args", ",".join(given)]
    if teacher and "target_sft" in objectives:
        parts += ["--teacher", teacher]
    parts += list(extra)
    return shlex.join(parts)
