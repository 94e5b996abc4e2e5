"""What a profile implies: placement on the continuum of arXiv 2510.00526 and the objectives to try
first, on planted profiles (all-high p_y, all-low, mixed), with the sources each one cites and the scale
they were measured at; the lab verdicts kept in advice.py against the lab's own results.json; a ranking
that follows the lab's verdicts (and the user's own lab results); the printed lab command parsed back by
the lab's own parser and compared with the advice."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from qtarget.cli import main as qtarget_main
from qtarget.lab.cli import build_parser as lab_parser
from qtarget.lab.row_args import merged_objective_args, parse_row_args
from qtarget.lab.settings import ROW_OBJECTIVE, settings_for
from qtarget.lab.stats import paired_difference
from qtarget.objectives.registry import get_objective
from qtarget.profile.advice import (
    BANDS,
    FINDINGS,
    LAB_RUN,
    LAB_VERDICTS,
    PAPER,
    advise,
    lab_command,
    place,
)
from qtarget.profile.compute import TokenProfile
from qtarget.profile.lab_results import read_lab_results
from qtarget.profile.report import terminal_report
from qtarget.profile.summary import summarize

LAB_RESULTS = Path(__file__).resolve().parents[1] / LAB_RUN / "results.json"


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
    return {s.where for r in advice.recommendations if r.objective == objective for s in r.finding.sources}


def test_all_high_p_y_is_model_strong_and_the_lab_reorders_the_prior_leaning_objectives():
    s = planted_summary(rng_beta(12, 1.5))
    assert s["mean_p_y"] > 0.81
    advice = advise(s)
    assert advice.placement.regime == "strong"
    assert [src.where for src in advice.placement.sources] == ["Table 5"]
    assert set(objectives(advice)) == {"prob", "profit", "dft", "sft"}
    assert {"Table 1", "Table 8", "Figure 7"} <= cites(advice, "prob")
    assert {"Table 1", "Figure 5"} <= cites(advice, "profit")
    assert all(src.paper == PAPER for r in advice.recommendations if r.objective in ("prob", "profit")
               for src in r.finding.sources)
    # the lab (SmolLM2-135M) contradicts "strong prior: DFT >= SFT on held-out NLL" (checked against its
    # results.json below): the prior-leaning objectives rank after sft, and each says why, with the scales
    assert LAB_VERDICTS["sum.dft_nll"].verdict == "contradicted"
    by = {r.objective: r for r in advice.recommendations}
    assert objectives(advice)[0] == "sft" and by["sft"].status == "borne out"
    for name in ("prob", "profit", "dft"):
        assert by[name].status == "contradicted"
        assert "ranked lower: the lab contradicts the paper at 135M" in by[name].ranked
        assert "DFT ≥ SFT on held-out NLL" in by[name].ranked
        assert re.search(r"the paper measured 1\.5B–\d+B models", by[name].ranked)  # its scale, by the lab's
    assert objectives(advice)[1:] == ["prob", "profit", "dft"]  # among equals, the paper's order
    d = advice.to_dict()
    dft = next(r for r in d["recommendations"] if r["name"] == "dft")
    assert any("contradicted" in t and "against" in t for t in dft["lab"])
    assert any("supported" in t and "→ for" in t for t in dft["lab"])  # its noise-fit claim holds
    assert advice.lab_objectives == ["sft", "prob", "profit", "dft"]
    assert advice.lab_args == {"prob": {"alpha": 1.0}, "profit": {"tau": 0.2}}
    assert "not a result" in d["caveat"]
    assert any("Table 6" in n for n in advice.notes)


def test_the_ranking_follows_the_lab_verdicts_not_a_fixed_order(monkeypatch):
    """Planted: the lab's strong-end claims flipped to supported. The prior-leaning objectives are then borne
    out and sft (which states the opposite) is the one ranked lower."""
    for key in ("sum.dft_gen", "sum.dft_nll"):
        monkeypatch.setitem(LAB_VERDICTS, key, dataclasses.replace(LAB_VERDICTS[key], verdict="supported"))
    advice = advise(planted_summary(rng_beta(12, 1.5)))
    assert objectives(advice) == ["prob", "profit", "dft", "sft"]
    by = {r.objective: r for r in advice.recommendations}
    assert by["dft"].status == "borne out" and by["dft"].ranked == ""
    assert by["sft"].status == "contradicted" and "ranked lower" in by["sft"].ranked
    # every claim inconclusive: no status moves anything, the paper's order stays
    for key in ("sum.dft_gen", "sum.dft_nll", "sum.dft_noise"):
        monkeypatch.setitem(LAB_VERDICTS, key, dataclasses.replace(LAB_VERDICTS[key], verdict="inconclusive"))
    advice = advise(planted_summary(rng_beta(12, 1.5)))
    assert objectives(advice) == ["prob", "profit", "dft", "sft"]
    assert all(r.status == "inconclusive" and not r.ranked for r in advice.recommendations)


def test_all_low_p_y_is_model_weak_and_recommends_nll():
    advice = advise(planted_summary(rng_beta(0.3, 12)))
    assert advice.placement.regime == "weak"
    assert objectives(advice) == ["sft"]
    assert {"Table 3", "Table 9"} <= cites(advice, "sft")
    assert advice.recommendations[0].status == "borne out"  # SFT >= DFT on held-out NLL, weak-prior task
    assert advice.lab_objectives == ["sft"] and advice.lab_args == {}


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
    # the lab contradicts PSFT's "no entropy collapse" on both of its tasks: psft goes last, saying so
    psft = advice.recommendations[-1]
    assert psft.objective == "psft" and psft.status == "contradicted" and "entropy" in psft.ranked


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
    assert advice.lab_args["target_sft"] == {"eta": 0.5}
    assert any("target_sft's residual" in n for n in advice.notes)


def test_noisy_tokens_under_a_strong_prior_are_flagged():
    p = np.concatenate([np.full(300, 0.97), np.full(100, 0.02)])  # mean 0.73: leaning strong, 25 % very unlikely
    advice = advise(planted_summary(p))
    assert advice.placement.regime == "strong_intermediate"
    assert any("Figure 5" in n for n in advice.notes)


def test_every_finding_names_a_registered_objective_sources_and_their_scale():
    for f in FINDINGS:
        get_objective(f.objective, **f.args)  # a real objective with valid arguments
        assert f.sources and all(s.paper and s.where and s.says and s.scale for s in f.sources)
        assert all(k in LAB_VERDICTS for k in f.lab + f.lab_opposed)
        # every source names the model sizes it was measured at (or says it does not know them)
        assert all(re.search(r"\d+(\.\d+)?B\b|sizes not recorded", s.scale) for s in f.sources), f.spec
    for b in BANDS:
        assert re.search(r"\d+(\.\d+)?B\b", b.source.scale)
    assert [b.regime for b in BANDS] == ["weak", "intermediate", "strong"]
    text = advise(planted_summary(rng_beta(12, 1.5))).recommendations[1].finding.sources[0].text()
    assert "[LLaMA-3.1-8B, DeepSeekMath-7B, Qwen2.5-Math-1.5B, Qwen2.5-Math-7B]" in text


def test_lab_verdicts_match_the_lab_results():
    """Every stored verdict is the committed example's computed one: task, prior class, rows, metric, verdict,
    interval and note."""
    per_task = json.loads(LAB_RESULTS.read_text())["per_task"]
    for v in LAB_VERDICTS.values():
        entry = per_task[v.task]
        assert entry["prior_class"] == v.prior
        (c,) = [c for c in entry["claims"] if c["statement"] == v.statement]
        assert (c["row"], c["versus"], c["metric"], c["verdict"], c["note"]) == (v.row, v.versus, v.metric,
                                                                                 v.verdict, v.note)
        assert (c["effect"]["value"], c["effect"]["lo"], c["effect"]["hi"]) == pytest.approx((v.effect, v.lo, v.hi))


def test_lab_command_is_exact_and_quoted():
    cmd = lab_command("my model", "data.jsonl", ["sft", "target_sft"], teacher="t dir",
                      objective_args={"target_sft": {"eta": 0.25}})
    assert shlex.split(cmd) == ["qtarget", "lab", "--model", "my model", "--dataset", "data.jsonl", "--objectives",
                                "sft,target_sft", "--objective_args", "target_sft.eta=0.25", "--teacher", "t dir"]
    # the teacher is only passed where an objective reads it
    assert "--teacher" not in lab_command("m", "d", ["sft", "dft"], teacher="t")


# ------------------------------------------------------------------------- advice <-> lab command
PLANTED = {  # planted profiles over every regime: (p_y, teacher p_y or None)
    "strong": (rng_beta(12, 1.5), None),
    "strong, teacher": (rng_beta(12, 1.5), np.clip(rng_beta(12, 1.5) + 0.02, 0, 1 - 1e-6)),
    "strong_intermediate": (np.concatenate([np.full(300, 0.97), np.full(100, 0.02)]), None),
    "intermediate, teacher": (np.concatenate([rng_beta(8, 1.5, 200), rng_beta(1, 4, 200)]),
                              np.concatenate([rng_beta(8, 1.5, 200), rng_beta(1, 4, 200)])),
    "weak_intermediate": (rng_beta(1, 4), None),
    "weak": (rng_beta(0.3, 12), None),
}


def trained_rows(cmd: str) -> tuple[list[tuple[str, str, dict]], object]:
    """What `qtarget lab` trains for a printed command: shlex, the lab's own parser, its --objective_args
    parser and its settings (the path of `qtarget.lab.cli.main`)."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["qtarget", "lab"]
    args = lab_parser().parse_args(argv[2:])
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    given = parse_row_args(args.objective_args, objectives)
    settings = settings_for("default", objectives=objectives, objective_args=merged_objective_args(given))
    return settings.runs(), args


@pytest.mark.parametrize("case", list(PLANTED))
def test_the_printed_lab_command_trains_exactly_what_the_advice_names(case):
    p_y, teacher_p_y = PLANTED[case]
    advice = advise(planted_summary(p_y, teacher_p_y), has_teacher=teacher_p_y is not None)
    assert advice.placement.regime == case.split(",")[0]
    cmd = lab_command("smollm2", "my data.jsonl", advice.lab_objectives, teacher="teacher dir",
                      objective_args=advice.lab_args)
    runs, args = trained_rows(cmd)
    assert (args.model, args.dataset) == ("smollm2", "my data.jsonl")
    assert args.teacher == ("teacher dir" if "target_sft" in advice.lab_objectives else None)
    rows = {row: (objective, run_args) for row, objective, run_args in runs}
    assert [row for row, _, _ in runs] == advice.lab_objectives and advice.lab_objectives[0] == "sft"
    named = [r.finding for r in advice.recommendations if r.finding.lab_row]
    assert {f.lab_row for f in named} | {"sft"} == set(rows)
    for f in named:
        objective, run_args = rows[f.lab_row]
        assert objective == ROW_OBJECTIVE.get(f.lab_row, f.lab_row) == f.objective
        # the objective the lab builds has exactly the parameters the advice names
        assert get_objective(objective, **run_args).params == get_objective(f.objective, **f.args).params, f.spec


def test_the_round_trip_catches_a_command_without_the_parameters():
    """The check above can fail: without --objective_args the lab would train profit at its registry
    default (τ = 0.1), not the τ = 0.2 the advice names."""
    advice = advise(planted_summary(rng_beta(12, 1.5)))
    runs, _ = trained_rows(lab_command("smollm2", "d.jsonl", advice.lab_objectives))
    (profit,) = [args for row, _, args in runs if row == "profit"]
    assert get_objective("profit", **profit).params["tau"] != advice.lab_args["profit"]["tau"] == 0.2


# ------------------------------------------------------------------------- the user's own lab results
def planted_lab_results(folder: Path) -> dict:
    """A results.json as `qtarget lab` writes it, with planted per-item values: prob answers right wherever
    sft does and more (it wins generation accuracy beyond its interval); profit was trained at τ = 0.1 (not
    what the advice names); dft is worse than sft."""
    rng = np.random.default_rng(4)
    n = 200
    sft = (rng.random(n) < 0.4).astype(float)
    prob = np.maximum(sft, (rng.random(n) < 0.4).astype(float))
    dft = sft * (rng.random(n) < 0.5)
    profit = sft.copy()

    def row(correct, nll):
        return {"gen.correct": [correct.tolist()], "gen.no_answer": [[0.0] * n],
                "rank.nll": [rng.normal(nll, 0.2, 64).tolist()]}

    items = {"base": row(np.zeros(n), 2.0), "sft": row(sft, 1.0), "prob": row(prob, 1.1), "profit": row(profit, 1.05),
             "dft": row(dft, 1.4)}
    rows = {"base": {"objective": None, "args": {}}, "sft": {"objective": "sft", "args": {}},
            "prob": {"objective": "prob", "args": {"alpha": 1.0}}, "profit": {"objective": "profit", "args": {}},
            "dft": {"objective": "dft", "args": {}}}
    results = {"settings": {"n_boot": 1000, "seed": 0}, "model": {"name": "planted"}, "tasks": ["user:d.jsonl"],
               "per_task": {"user:d.jsonl": {"items": items, "rows": rows}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return {"sft": sft, "prob": prob, "dft": dft, "profit": profit}


def test_lab_results_say_which_objective_won_and_rank_the_advice(tmp_path):
    arrays = planted_lab_results(tmp_path / "lab")
    outcome = read_lab_results(tmp_path / "lab")
    (task,) = outcome.tasks
    gen = next(w for w in task.winners if w["metric"] == "gen_acc")
    assert gen["row"] == "prob" and gen["value"]["value"] == pytest.approx(arrays["prob"].mean())
    runner = gen["runner_up"]
    assert runner in ("sft", "profit")
    ref = paired_difference(arrays["prob"], arrays[runner], n_boot=1000, seed=0)
    assert (gen["lead"]["value"], gen["lead"]["lo"], gen["lead"]["hi"]) == pytest.approx((ref.value, ref.lo, ref.hi))
    assert gen["decided"] and ref.lo > 0
    assert any(line.startswith("task user:d.jsonl, in-domain accuracy (generation) (higher is better): prob won "
                               f"with {arrays['prob'].mean():.3f}") and "decided" in line for line in outcome.lines())
    # the advice: prob (the winner) first; profit was trained with other parameters, so it is not measured;
    # sft and dft lost beyond their intervals
    advice = advise(planted_summary(rng_beta(12, 1.5)), lab_results=outcome)
    assert objectives(advice) == ["prob", "profit", "sft", "dft"]
    by = {r.objective: r for r in advice.recommendations}
    assert by["prob"].your_tier == 0 and any(y.endswith("won") for y in by["prob"].yours)
    d = paired_difference(arrays["prob"], arrays["sft"], n_boot=1000, seed=0)
    assert f"prob − sft: {d.value:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]" in " ".join(by["prob"].yours)
    assert by["profit"].your_tier == 1 and by["profit"].yours == [f"not trained in {tmp_path / 'lab'}"]
    assert by["sft"].your_tier == 2 and "lost to the winner on your own lab results" in by["sft"].ranked
    assert by["dft"].your_tier == 2 and any("behind the winner prob" in y for y in by["dft"].yours)
    assert advice.your_lab == outcome.lines() and advice.to_dict()["your_lab"] == outcome.lines()
    text = terminal_report(planted_summary(rng_beta(12, 1.5)), advice)
    assert "which objective won in your own lab run:" in text and "prob won with" in text


def test_lab_results_refuse_a_folder_without_results(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--lab_results .*no results.json"):
        read_lab_results(tmp_path)
    (tmp_path / "results.json").write_text('{"settings": {}}')
    with pytest.raises(ValueError, match="--lab_results .*not a results.json written by `qtarget lab`"):
        read_lab_results(tmp_path)
    rc = qtarget_main(["profile", "--model", "tiny", "--dataset", "d.jsonl", "--lab_results", str(tmp_path / "no")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--lab_results" in err[0] and "no results.json" in err[0]
