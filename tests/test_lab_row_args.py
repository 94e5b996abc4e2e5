"""`qtarget lab --objective_args ROW.PARAM=V,...`: a row's parameters from the command line, through the
lab's main into the settings that the runner trains (`settings.runs()`); bad input as one line, exit 2."""
from __future__ import annotations

import pytest

from qtarget.cli import main as qtarget_main
from qtarget.lab import cli as lab_cli
from qtarget.lab.row_args import format_value, merged_objective_args, parse_row_args, parse_value
from qtarget.lab.settings import OBJECTIVE_ARGS, OBJECTIVES, settings_for
from qtarget.objectives import get_objective


def test_values_round_trip():
    for text, value in (("0.2", 0.2), ("8", 8), ("1e-3", 1e-3), ("1.0", 1.0), ("true", True), ("False", False),
                        ("p_y", "p_y")):
        assert parse_value(text) == value and type(parse_value(text)) is type(value)
        assert parse_value(format_value(value)) == value


def test_given_parameters_replace_single_parameters_of_single_rows():
    given = parse_row_args(["profit.tau=0.2,psft.eps=0.2", "dft_floor.gamma_min=0.1"],
                           ["sft", "profit", "psft", "dft_floor"])
    assert given == {"profit": {"tau": 0.2}, "psft": {"eps": 0.2}, "dft_floor": {"gamma_min": 0.1}}
    merged = merged_objective_args(given)
    assert merged["profit"] == {"tau": 0.2} and merged["psft"] == {"eps": 0.2}
    # the rest of a row's lab parameters stay (dft_floor is the target objective with three of them)
    assert merged["dft_floor"] == {**OBJECTIVE_ARGS["dft_floor"], "gamma_min": 0.1}
    assert merged["target_sft"] == OBJECTIVE_ARGS["target_sft"]
    runs = settings_for("tiny", objectives=("sft", "profit", "dft_floor"), objective_args=merged).runs()
    args = {row: a for row, _, a in runs}
    assert args["dft_floor"]["gamma_min"] == 0.1
    assert get_objective("profit", **args["profit"]).params["tau"] == 0.2 != get_objective("profit").params["tau"]
    get_objective("target", **args["dft_floor"])  # builds
    assert merged_objective_args({}) is None  # nothing given: the default settings (and their digest)


@pytest.mark.parametrize("spec, rows, message", [
    ("profit.tau", ["profit"], "expected ROW.PARAM=VALUE"),
    ("tau=0.2", ["profit"], "expected ROW.PARAM=VALUE"),
    ("profit.tau=0.2", ["sft", "dft"], "row 'profit' is not trained in this run"),
    ("profit.eta=0.2", ["profit"], "profit has no parameter 'eta'; its parameters: tau"),
    ("profit.tau=2", ["profit"], "--objective_args profit.tau=2"),
    ("profit.tau=0.1,profit.tau=0.2", ["profit"], "profit.tau is given twice"),
])
def test_bad_specs_name_the_flag(spec, rows, message):
    with pytest.raises(ValueError, match="--objective_args") as e:
        parse_row_args([spec], rows)
    assert message in str(e.value)


def test_a_swept_parameter_cannot_be_fixed_too():
    sweep = (("psft", "eps", (0.1, 0.2)),)
    with pytest.raises(ValueError, match="psft.eps is swept by --sweep"):
        parse_row_args(["psft.eps=0.3"], ["sft", "psft"], sweep)


def test_lab_main_passes_the_parameters_to_the_runner(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run_lab(settings, out, **kw):
        seen["settings"] = settings
        raise SystemExit(0)  # stop before training

    monkeypatch.setattr(lab_cli, "run_lab", fake_run_lab)
    with pytest.raises(SystemExit):
        lab_cli.main(["--tiny", "--objectives", "sft,profit,psft", "--objective_args", "profit.tau=0.2",
                      "--objective_args", "psft.eps=0.2", "--output_dir", str(tmp_path / "o")])
    runs = {row: (objective, args) for row, objective, args in seen["settings"].runs()}
    assert runs == {"sft": ("sft", {}), "profit": ("profit", {"tau": 0.2}), "psft": ("psft", {"eps": 0.2})}
    # without the flag every row keeps the lab's parameters
    with pytest.raises(SystemExit):
        lab_cli.main(["--tiny", "--output_dir", str(tmp_path / "o")])
    assert [r for r, _, _ in seen["settings"].runs()] == list(OBJECTIVES)
    assert seen["settings"].objective_args == OBJECTIVE_ARGS


def test_lab_refuses_a_bad_spec_in_one_line(tmp_path, capsys):
    rc = qtarget_main(["lab", "--tiny", "--objectives", "sft,dft", "--objective_args", "profit.tau=0.2",
                       "--output_dir", str(tmp_path / "o"), "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--objective_args" in err[0] and "not trained in this run" in err[0]
    assert not (tmp_path / "o").exists()  # nothing written before validation
