"""Every objective refuses parameters it does not read: the error names the objective, the unknown
parameter and the accepted ones; on the CLI it is one line with exit status 2."""
from __future__ import annotations

import pytest

import qtarget
from qtarget import cli
from qtarget.objectives import objective_parameters


@pytest.mark.parametrize("name", qtarget.list_objectives())
def test_unknown_parameter_is_refused_by_every_objective(name):
    with pytest.raises(ValueError) as info:
        qtarget.get_objective(name, not_a_parameter=0.1)
    message = str(info.value)
    assert f"objective {name!r}" in message and "not_a_parameter" in message
    for accepted in objective_parameters(name):
        assert accepted in message, (name, accepted, message)
    if not objective_parameters(name):
        assert "takes no parameters" in message


@pytest.mark.parametrize("name,param", [("sft", "lam"), ("dft", "lam"), ("token_weighted", "alpha"),
                                        ("asft", "eta"), ("target_sft", "lam")])
def test_a_parameter_of_another_objective_is_refused(name, param):
    """`--objective dft --objective_args lam=0.1` used to train plain DFT silently."""
    with pytest.raises(ValueError, match=rf"objective {name!r} got unknown parameter\(s\) \[{param!r}\]"):
        qtarget.get_objective(name, **{param: 0.1})


def test_every_default_builds_and_takes_its_own_parameters():
    for name in qtarget.list_objectives():
        defaults = {k: v for k, v in objective_parameters(name).items() if v is not None}
        assert qtarget.get_objective(name, **defaults).name in (name, "target")


def test_cli_reports_one_line_with_exit_2(tmp_path, capsys):
    code = cli.main(["train", "--objective", "dft", "--objective_args", "lam=0.1", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("qtarget train: error: ")
    assert "objective 'dft' got unknown parameter(s) ['lam']" in err and "Traceback" not in err


def test_lab_accepts_every_registered_objective_with_its_defaults():
    from qtarget.lab.settings import LabSettings

    names = tuple(qtarget.list_objectives())
    settings = LabSettings(objectives=names)
    runs = {objective: args for _, objective, args in settings.runs()}
    assert set(runs) == set(names)
    for name, args in runs.items():
        qtarget.get_objective(name, **args)  # the lab's arguments are accepted by the objective
    with pytest.raises(ValueError, match=r"unknown objective\(s\) \['nope'\]"):
        LabSettings(objectives=("sft", "nope"))


def test_new_parameters_reach_the_objective_from_config_and_sweep(tmp_path):
    from qtarget.lab.sweep import parse_sweep
    from qtarget.training import QTargetConfig

    cfg = QTargetConfig(output_dir=str(tmp_path), objective="prob_masked", objective_args="q=0.3,side=below",
                        use_cpu=True, report_to="none")
    assert repr(cfg.build_objective()) == "prob_masked(q=0.3, side='below')"
    assert parse_sweep(["nll_masked.side=above,below"]) == (("nll_masked", "side", ("above", "below")),)
    assert parse_sweep(["prift_mass.tau=0.3,0.5"]) == (("prift_mass", "tau", (0.3, 0.5)),)
    with pytest.raises(ValueError, match=r"--sweep prob_masked.side='middle'.*`side` must be one of"):
        parse_sweep(["prob_masked.side=above,middle"])
