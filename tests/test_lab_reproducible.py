"""What reproduces where (docs/lab.md): on the same machine the lab's results.csv and curves.csv are
byte-identical between two runs from empty teacher caches; results.json records the machine the numbers came
from; `qtarget lab --compare` reports verdict agreement and how far values moved, and fails only on a
supported <-> contradicted reversal (planted results)."""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import torch

from qtarget.cli import main as qtarget_main
from qtarget.lab.compare import compare_results
from qtarget.lab.runner import run_lab
from qtarget.lab.settings import settings_for

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "lab_example"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The tiny lab twice, each into a fresh output folder with its own empty teacher cache: the second
    run trains its own teacher instead of loading the first's."""
    # the cheapest run with a teacher and claims: one task, the reference row and target_sft, 2 steps
    settings = settings_for("tiny", objectives=("sft", "target_sft"), tasks=("sum",), steps=2)
    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"lab_{name}")
        run_lab(settings, out, progress=False, cache_dir=tmp_path_factory.mktemp(f"cache_{name}"))
        outs.append(out)
    return settings, outs[0], outs[1]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_same_machine_gives_byte_identical_csv(two_runs):
    _, a, b = two_runs
    ra, rb = _results(a), _results(b)
    # both runs trained their teacher (nothing was shared through a cache)
    assert ra["per_task"]["sum"]["teacher"]["cached"] is False and rb["per_task"]["sum"]["teacher"]["cached"] is False
    assert ra["per_task"]["sum"]["claims"], "the run has claims to compare"
    assert (a / "results.csv").read_bytes() == (b / "results.csv").read_bytes()
    assert (a / "curves.csv").read_bytes() == (b / "curves.csv").read_bytes()
    # and the per-item values and generated answers behind them
    assert ra["per_task"]["sum"]["items"] == rb["per_task"]["sum"]["items"]
    assert ra["per_task"]["sum"]["responses"] == rb["per_task"]["sum"]["responses"]


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def test_results_json_records_the_machine(two_runs):
    settings, a, _ = two_runs
    machine = _results(a)["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["precision"] == settings.precision in ("bf16", "fp32")  # auto resolved on this CPU
    assert machine["threads"] == settings.threads
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    model = _cpuinfo_field("model name")
    if model is not None:
        assert machine["cpu"] == model
        flags = set((_cpuinfo_field("flags") or "").split())
        assert set(machine["cpu_flags"]) <= flags and ("avx2" in machine["cpu_flags"]) == ("avx2" in flags)
    else:
        assert machine["cpu"]


def test_compare_two_runs_on_the_same_machine(two_runs, capsys):
    _, a, b = two_runs
    cmp = compare_results(a, b)
    assert cmp.csv_identical is True and cmp.same_machine is True and not cmp.settings_differ
    assert cmp.claims and all(c.agrees and c.moved == 0.0 for c in cmp.claims)
    assert cmp.estimates and all(e.relative == 0.0 for e in cmp.estimates)
    assert cmp.exit_code == 0
    assert qtarget_main(["lab", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "results.csv: byte-identical" in out and "settings: results.csv should be byte-identical" in out
    n = len(cmp.claims)
    assert f"claims: {n} of {n} verdicts agree; 0 reversed" in out


# ----------------------------------------------------------------------------------- planted results
def _plant(folder: Path, results: dict) -> Path:
    """A results folder: results.json and a results.csv written from it."""
    from qtarget.lab.report import write_csv

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    write_csv(results, folder / "results.csv")
    return folder


def _scaled(results: dict, factor: float) -> dict:
    """Every estimate and difference (value and interval) times `factor`: a machine whose kernels round
    every number 1-3 % differently, verdicts unchanged."""
    out = copy.deepcopy(results)
    for entry in out["per_task"].values():
        for table in (entry["estimates"], entry["vs_reference"]):
            for by_metric in table.values():
                for e in by_metric.values():
                    if e and "value" in e:
                        for k in ("value", "lo", "hi"):
                            e[k] *= factor
    return out


@pytest.fixture(scope="module")
def example():
    return json.loads((EXAMPLE / "results.json").read_text())


def test_the_committed_example_against_itself(example, tmp_path):
    a = _plant(tmp_path / "a", example)
    cmp = compare_results(a, EXAMPLE)
    n_claims = sum(len(e["claims"]) for e in example["per_task"].values())
    assert len(cmp.claims) == n_claims and not cmp.only_a and not cmp.only_b
    assert all(c.agrees and c.moved == 0 for c in cmp.claims) and cmp.exit_code == 0
    assert all(e.relative == 0 for e in cmp.estimates) and cmp.estimates
    assert compare_results(a, _plant(tmp_path / "b", example)).csv_identical is True


def test_values_moved_by_a_few_percent_keep_the_exit_status(example, tmp_path):
    a = _plant(tmp_path / "a", example)
    b = _plant(tmp_path / "b", _scaled(example, 1.02))
    cmp = compare_results(a, b)
    assert cmp.csv_identical is False and cmp.exit_code == 0
    assert all(c.agrees for c in cmp.claims)
    # every nonzero number moved by 2 % of the larger one: 0.02 / 1.02
    values = [e["value"] for entry in example["per_task"].values() for t in (entry["estimates"], entry["vs_reference"])
              for m in t.values() for e in m.values() if e and "value" in e]
    assert len(cmp.estimates) == len(values)
    nonzero = [e for e in cmp.estimates if e.a["value"] != 0]
    assert len(nonzero) == sum(v != 0 for v in values)
    for e in nonzero:
        assert e.relative == pytest.approx(0.02 / 1.02, rel=1e-9)
    assert all(c.moved == 0.0 for c in cmp.claims)   # the claims' stored effects were left as they were
    text = cmp.render()
    assert f"numbers: {len(nonzero)} of {len(values)} moved" in text
    assert f"relative change median {100 * statistics.median([0.02 / 1.02 if v else 0.0 for v in values]):.1f} %" in text


def _claim_index(results: dict, verdict: str) -> tuple[str, int]:
    for task, entry in results["per_task"].items():
        for i, c in enumerate(entry["claims"]):
            if c["verdict"] == verdict:
                return task, i
    raise AssertionError(f"the example has no {verdict} claim")


def test_a_reversed_verdict_fails_and_an_inconclusive_one_does_not(example, tmp_path, capsys):
    a = _plant(tmp_path / "a", example)
    # supported -> inconclusive, with the effect moved: reported, exit 0
    soft = copy.deepcopy(example)
    task, i = _claim_index(soft, "supported")
    c = soft["per_task"][task]["claims"][i]
    old = dict(c["effect"])
    c["verdict"] = "inconclusive"
    c["effect"] = {**old, "value": old["value"] - 0.3 * (old["hi"] - old["lo"]),
                   "lo": old["lo"] - 0.5 * (old["hi"] - old["lo"]), "hi": old["hi"] - 0.5 * (old["hi"] - old["lo"])}
    b = _plant(tmp_path / "soft", soft)
    cmp = compare_results(a, b)
    (changed,) = [x for x in cmp.claims if not x.agrees]
    assert (changed.task, changed.row, changed.metric) == (task, c["row"], c["metric"])
    assert not changed.reversed and cmp.exit_code == 0
    # moved 0.3 widths = 0.6 half-widths of the old interval; the new interval is as wide
    assert changed.moved == pytest.approx(0.6, rel=1e-9)
    assert qtarget_main(["lab", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"claims: {len(cmp.claims) - 1} of {len(cmp.claims)} verdicts agree; 0 reversed" in out
    assert "| changed " + c["statement"] in out
    # supported -> contradicted: a reversal, exit 1, named
    hard = copy.deepcopy(example)
    hard["per_task"][task]["claims"][i]["verdict"] = "contradicted"
    b = _plant(tmp_path / "hard", hard)
    cmp = compare_results(a, b)
    assert [(x.task, x.statement) for x in cmp.reversals] == [(task, c["statement"])] and cmp.exit_code == 1
    assert qtarget_main(["lab", "--compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "1 reversed" in out and "| REVERSED " + c["statement"] in out
    # and back (contradicted -> supported) is a reversal too
    assert compare_results(b, a).exit_code == 1


def test_different_settings_and_machines_are_named(example, tmp_path):
    other = _scaled(example, 0.99)
    other["settings"] = {**example["settings"], "steps": example["settings"]["steps"] * 2}
    mine = copy.deepcopy(example)
    mine["machine"] = {"cpu": "CPU A", "cpu_capability": "AVX512", "torch": "2.13.0", "precision": "bf16", "threads": 2}
    other["machine"] = {**mine["machine"], "cpu": "CPU B", "cpu_capability": "AVX2"}
    task, i = _claim_index(other, "supported")
    dropped = other["per_task"][task]["claims"].pop(i)
    cmp = compare_results(_plant(tmp_path / "a", mine), _plant(tmp_path / "b", other))
    assert cmp.same_machine is False and set(cmp.settings_differ) == {"steps"}
    assert cmp.only_a == [(task, dropped["row"], dropped["versus"], dropped["metric"], dropped["kind"])]
    text = cmp.render()
    assert "another machine kind (cpu, cpu_capability differ)" in text
    assert "settings differ (steps:" in text and "claims only in A:" in text
    # threads and precision change how the numbers are computed, not the experiment
    threads = copy.deepcopy(mine)
    threads["settings"] = {**mine["settings"], "threads": mine["settings"]["threads"] + 1}
    text = compare_results(tmp_path / "a", _plant(tmp_path / "c", threads)).render()
    assert f"compute settings differ (threads: {mine['settings']['threads']} vs" in text
    assert "two experiments" not in text and "numbers: none of" in text


def test_a_task_of_another_version_is_named(example, tmp_path):
    """A run of a task whose generator changed (other evaluation items) is two experiments on that task."""
    task = next(iter(example["per_task"]))
    other = copy.deepcopy(example)
    version = other["per_task"][task]["data"]["task"]["version"]
    other["per_task"][task]["data"]["task"]["version"] = version + "-next"
    cmp = compare_results(_plant(tmp_path / "a", example), _plant(tmp_path / "b", other))
    assert cmp.tasks_differ == {task: (version, version + "-next")}
    assert f"task versions differ ({task}: {version} vs {version}-next)" in cmp.render()
    assert compare_results(tmp_path / "a", _plant(tmp_path / "c", example)).tasks_differ == {}


def test_compare_refuses_a_folder_without_results(tmp_path, capsys):
    assert qtarget_main(["lab", "--compare", str(tmp_path), str(EXAMPLE)]) == 2
    err = capsys.readouterr().err
    assert "--compare" in err and str(tmp_path) in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    assert qtarget_main(["lab", "--compare", str(EXAMPLE), str(tmp_path)]) == 2
    assert "not a lab results.json" in capsys.readouterr().err
