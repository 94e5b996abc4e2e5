"""`qtarget lab --tiny`: the whole lab pipeline on a random 2-layer model, through the real trainer,
including a 2-point sweep.

Checks that every objective trained (exactly the trainable parameters changed, finite losses, every
step logged, PSFT refreshed pi_old); that every interval and paired difference in results.json is the
statistic recomputed from the per-item values it stores; that verdicts follow their intervals; that the
report holds every row, the claims and no absolute path; that the teacher is cached and reused; and that
a rerun with the same seed gives the same numbers.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from qtarget.lab import stats
from qtarget.lab.analysis import NO_SEPARATION, separates
from qtarget.cli import main as qtarget_main
from qtarget.lab.plots import TABLE_METRICS
from qtarget.lab.runner import run_lab
from qtarget.lab.settings import OBJECTIVES, settings_for


def lab_main(argv: list[str]) -> int:
    """`qtarget lab ARGV` through the one CLI wrapper (bad input: one line, exit 2)."""
    return qtarget_main(["lab", *argv])

ROWS = ("base",) + OBJECTIVES
TASKS = ("glyph", "sum")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab_tiny")
    cache = tmp_path_factory.mktemp("lab_cache")
    settings = settings_for("tiny")
    results = run_lab(settings, out, progress=False, cache_dir=cache)
    return settings, out, cache, results


def _expected_changed_fraction(settings) -> float:
    from qtarget.lab.finetune import set_trainable
    from qtarget.models import load_tokenizer, tiny_causal_lm

    model = tiny_causal_lm(load_tokenizer("smollm2"), hidden_size=64, num_layers=2, num_heads=4, seed=settings.seed)
    set_trainable(model, settings.train_top_layers)
    flags = [p.requires_grad for _, p in model.named_parameters()]
    return sum(flags) / len(flags)


def test_every_objective_trained(tiny_run):
    settings, _, _, results = tiny_run
    expected = _expected_changed_fraction(settings)
    assert 0 < expected < 1
    assert results["tasks"] == list(TASKS) == list(settings.tasks)
    for task, name in [(t, n) for t in TASKS for n in OBJECTIVES]:
        (run,) = results["per_task"][task]["rows"][name]["runs"]
        assert run["changed_param_tensors"] == pytest.approx(expected), name  # trainable ones moved, frozen did not
        history = run["history"]
        assert [h["step"] for h in history] == list(range(1, settings.steps + 1)), name
        for h in history:
            for key in ("loss", "nll", "p_y", "entropy", "gamma"):
                assert math.isfinite(h[key]), (name, key, h)
        assert run["params"]["trainable"] < run["params"]["total"]
    rows = results["per_task"]["glyph"]["rows"]
    assert rows["psft"]["runs"][0]["psft_refreshes"] == settings.steps // settings.psft_updates_per_batch
    assert all("kl_ref" in h for h in rows["asft"]["runs"][0]["history"])
    assert all("kl_teacher" in h for h in rows["target_sft"]["runs"][0]["history"])
    # the floored row's mean gamma never drops below its floor; prift's gamma comes from the frozen base
    assert all(h["gamma"] >= 0.2 - 1e-6 for h in rows["dft_floor"]["runs"][0]["history"])
    assert rows["prift"]["objective"] == "target" and rows["prift"]["args"]["gamma_from"] == "reference"


def test_json_intervals_are_recomputable_from_its_items(tiny_run):
    settings, out, _, _ = tiny_run
    everything = json.loads((out / "results.json").read_text())
    data = everything["per_task"]["glyph"]
    items = {r: {k: np.array(v) for k, v in d.items()} for r, d in data["items"].items()}
    assert set(items) == set(ROWS)
    n = {"gen.correct": settings.eval_in_domain, "rank.correct": settings.rank_items, "ood.nll": settings.ood_texts}
    for row in ROWS:
        for key, size in n.items():
            assert items[row][key].shape == (1, size), (row, key)
    kw = dict(n_boot=settings.n_boot, seed=settings.seed)
    # a plain metric: the mean of its items and the same bootstrap
    sft_acc = data["estimates"]["sft"]["rank_acc"]
    assert sft_acc == stats.mean_interval(items["sft"]["rank.correct"], **kw).to_dict()
    # forgetting of dft paired with sft: (dft - base) - (sft - base), per item
    d = data["vs_reference"]["dft"]["forgetting"]
    fd = items["dft"]["ood.nll"] - items["base"]["ood.nll"]
    fs = items["sft"]["ood.nll"] - items["base"]["ood.nll"]
    assert d == stats.mean_interval(fd - fs, **kw).to_dict()
    assert d["value"] == pytest.approx(float((fd - fs).mean()), abs=1e-9)
    # noise fit: corrupted-token gain minus clean-token gain, two groups
    nf = data["estimates"]["target_sft"]["noise_fit"]
    c, k = items["target_sft"]["noise.corrupt"], items["target_sft"]["noise.clean"]
    assert c.shape[1] > 0 and k.shape[1] > 0
    assert nf == stats.group_difference(c, k, **kw).to_dict()
    assert "noise_fit" not in data["estimates"]["base"] and "forgetting" not in data["estimates"]["base"]
    # format failures are counted apart from wrong answers: never both correct and without an answer
    for row in ROWS:
        assert not np.any((items[row]["gen.correct"] == 1) & (items[row]["gen.no_answer"] == 1))


def test_verdicts_follow_their_intervals(tiny_run):
    _, out, _, _ = tiny_run
    for task in TASKS:
        data = json.loads((out / "results.json").read_text())["per_task"][task]
        items = {r: {k: np.array(v) for k, v in d.items()} for r, d in data["items"].items()}
        claimed = {(c["row"], c["versus"], c["metric"]) for c in data["claims"]}
        assert ("dft", "sft", "noise_fit") in claimed and ("psft", "sft", "entropy") in claimed
        for c in data["claims"]:
            e = stats.Estimate(**c["effect"])
            malformed = c["metric"] == "gen_acc" and any(
                data["estimates"][r]["format_fail"]["lo"] > 0.5 for r in (c["row"], c["versus"]))
            silent = not separates(items, c["metric"], n_boot=200, seed=0)
            assert bool(c["note"]) == (malformed or silent)
            assert c["verdict"] == ("inconclusive" if malformed or silent else stats.verdict(e, c["kind"], c["margin"]))
            assert (c["note"] == NO_SEPARATION) == (silent and not malformed)


def test_report_has_every_row_claims_and_no_absolute_path(tiny_run):
    _, out, cache, _ = tiny_run
    text = (out / "report.md").read_text()
    for task in TASKS:
        section = text.split(f"## Task `{task}`")[1]
        table = [line for line in section.split("\n\n")[2].splitlines()]
        body = [line.strip("|").split("|")[0].strip() for line in table[2:]]
        assert body == list(ROWS)
        for line in table[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")][1:]
            assert len(cells) == len(TABLE_METRICS)
            assert all(c == "—" or "[" in c for c in cells), line   # every number with its interval
    assert "### Claims" in text and "### Difference from sft" in text and "## Prior profiles" in text
    assert "### DFT's low-prior failure and its fixes" in text and "## The continuum" in text
    assert "Training reads it from a teacher cache" in text   # target_sft's run recorded its teacher cache
    n_sum = tiny_run[3]["settings"]["rank_items"] * 2
    (what_sum,) = [line for line in text.splitlines() if line.startswith("- **Task `sum`**")]
    assert f"distractors: the result slipped by ±2 (±1, ±3 where needed) ({n_sum})" in what_sum
    for root in (str(out), str(cache), "/root", "/home", "/tmp"):
        assert root not in text and root not in (out / "results.json").read_text()
    for png in ["prior.png"] + [f"{kind}_{t}.png" for t in TASKS for kind in ("effects", "curves", "learning", "budget")]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "row,metric,value,lo,hi,n,seeds,diff_vs_ref,diff_lo,diff_hi,task"
    assert {line.rsplit(",", 1)[1] for line in csv_lines[1:]} == set(TASKS) and len(csv_lines) > 2 * len(ROWS) * 5
    assert any(line.startswith("base,rank_margin,") for line in csv_lines)


def test_report_from_results_json_recomputes_the_same_numbers(tiny_run, tmp_path):
    _, out, _, results = tiny_run
    assert lab_main(["--report_from", str(out / "results.json"), "--output_dir", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    first = json.loads((out / "results.json").read_text())
    for task in TASKS:
        for key in ("estimates", "vs_reference", "claims", "budget", "curve_estimates", "prior"):
            assert again["per_task"][task][key] == first["per_task"][task][key], key
    assert again["continuum"] == first["continuum"]
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()
    assert lab_main(["--report_from", str(tmp_path / "missing.json")]) == 2


def test_rerun_is_deterministic_and_reuses_the_cached_teacher(tiny_run, tmp_path):
    settings, _, cache, first = tiny_run
    again = run_lab(settings_for("tiny", objectives=("psft", "target_sft"), tasks=("sum",)), tmp_path,
                    progress=False, cache_dir=cache)
    new, old = again["per_task"]["sum"], first["per_task"]["sum"]
    assert new["teacher"]["cached"] is True
    assert new["teacher"]["key"] == old["teacher"]["key"] != first["per_task"]["glyph"]["teacher"]["key"]
    assert "loaded from the cache" in (tmp_path / "report.md").read_text()
    for name in ("base", "psft", "target_sft"):
        assert new["items"][name] == old["items"][name], name
        assert new["curves"].get(name) == old["curves"].get(name), name
        assert new["responses"][name] == old["responses"][name], name
        a, b = old["rows"][name]["runs"][0], new["rows"][name]["runs"][0]
        if name != "base":
            strip = lambda hist: [{k: v for k, v in h.items() if k not in ("tokens_per_s",)} for h in hist]  # noqa: E731
            assert strip(a["history"]) == strip(b["history"]), name


def test_one_curve_point_measures_the_end_only(tiny_run, tmp_path):
    """--curve_points 1 (the --quick preset): no intermediate checkpoint, so no verdicts against the budget and
    no learning-curve plots; the end-of-training metrics equal those of a run with curves (same seed)."""
    settings, _, cache, first = tiny_run
    one = run_lab(settings_for("tiny", objectives=("sft",), tasks=("sum",), curve_points=1), tmp_path,
                  progress=False, cache_dir=cache)
    entry = one["per_task"]["sum"]
    assert entry["curve_steps"] == [settings.steps] and entry["budget"] == []
    assert list(entry["curves"]["sft"]) == [str(settings.steps)]
    assert entry["items"]["sft"] == first["per_task"]["sum"]["items"]["sft"]
    assert not list(tmp_path.glob("budget_*.png")) and not list(tmp_path.glob("learning_*.png"))
    text = (tmp_path / "report.md").read_text()
    assert "No learning curves (`--curve_points 1`" in text and "against the training budget" not in text
    # the flag reaches the settings from the command line
    assert lab_main(["--tiny", "--objectives", "sft", "--tasks", "sum", "--curve_points", "1", "--no_progress",
                     "--output_dir", str(tmp_path / "cli")]) == 0
    from_cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert from_cli["settings"]["curve_points"] == 1 and from_cli["per_task"]["sum"]["curve_steps"] == [settings.steps]


def test_two_point_sweep_through_the_cli(tmp_path, capsys):
    rc = lab_main(["--tiny", "--tasks", "shop", "--sweep", "eps=0.1,0.28", "--output_dir", str(tmp_path), "--no_progress",
                   "--threads", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())["per_task"]["shop"]
    assert list(data["rows"]) == ["base", "sft", "psft eps=0.1", "psft eps=0.28"]
    assert [data["rows"][r]["args"].get("eps") for r in ("psft eps=0.1", "psft eps=0.28")] == [0.1, 0.28]
    for row in ("psft eps=0.1", "psft eps=0.28"):
        assert set(data["vs_reference"][row]) >= {"gen_acc", "rank_acc", "noise_fit", "forgetting", "entropy"}
    assert (tmp_path / "sweep_shop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Sweep" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("spec,message", [
    ("eta", "expected PARAM=V1,V2"),
    ("nope=1,2", "'nope'"),
    ("eta=0.5", "at least two distinct values"),
    ("eta=0,2", "eta"),
    ("target.gamma=p_y,nonsense", "gamma"),
])
def test_bad_sweep_names_the_argument(spec, message, capsys, tmp_path):
    assert lab_main(["--tiny", "--sweep", spec, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--sweep" in err and message in err


def test_sweep_with_objectives_is_refused(capsys, tmp_path):
    assert lab_main(["--tiny", "--sweep", "eta=0,1", "--objectives", "dft", "--output_dir", str(tmp_path)]) == 2
    assert "--objectives" in capsys.readouterr().err


def test_a_task_of_another_kind_runs_through_the_same_lab(tmp_path):
    """A LabTask with string answers, no system turn and no noise metadata: the runner, metrics and report
    take it as they take the arithmetic task (noise fit is simply not measured)."""
    from qtarget.evaluation import Problem
    from qtarget.lab.task import LabTask

    capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima"),
                ("Egypt", "Cairo"), ("Chile", "Santiago"), ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("Fiji", "Suva")]

    def demonstrations(seed, n, noise):
        return [{"prompt": f"Capital of {c}?", "response": f"Capital: {k}.", "noise": "clean"}
                for c, k in (capitals[(seed + i) % 6] for i in range(n))]

    def parse(response):
        found = re.findall(r"Capital: (\w+)", response)
        return found[-1] if found else None

    task = LabTask(
        name="capitals", version="1", description="capital cities", noise_description="none", instruction=None,
        demonstrations=demonstrations,
        generation=tuple(Problem(f"g{i}", f"Capital of {c}?", k, "capitals") for i, (c, k) in enumerate(capitals[6:])),
        parse_answer=parse,
        ranking=tuple({"id": f"r{i}", "prompt": f"Capital of {c}?", "candidates": [f"Capital: {k}.", "Capital: Oslo."]}
                      for i, (c, k) in enumerate(capitals[6:])),
        ood=("The quick brown fox jumps over the lazy dog near the river bank.",) * 3,
        example={"prompt": "Capital of France?", "response": "Capital: Paris."})
    results = run_lab(settings_for("tiny", objectives=("sft",)), tmp_path, progress=False, task=task,
                      cache_dir=tmp_path / "cache")
    assert results["tasks"] == ["capitals"]
    entry = results["per_task"]["capitals"]
    items = entry["items"]
    assert set(items) == {"base", "sft"}
    assert np.asarray(items["sft"]["gen.correct"]).shape == (1, 4)
    assert np.asarray(items["sft"]["rank.correct"]).shape == (1, 4)
    assert not any(k.startswith("noise.") for k in items["sft"])
    assert "noise_fit" not in entry["estimates"]["sft"] and "rank_acc" in entry["estimates"]["sft"]
    assert entry["data"]["task"]["name"] == "capitals" and entry["prior"]["tokens"] > 0
    assert "capital cities" in (tmp_path / "report.md").read_text()
