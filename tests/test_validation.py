"""What a user types is read the same way by every command: boolean flags take `--flag`, `--flag true`
and `--flag false`; a negative number written `-1e-3` reaches its flag (and its range check); --help
lists model, data, objective and output first and prints no `%%`; numeric ranges are refused by flag.
And a --max_length beyond the model's positions is clamped with a warning, never a failure at step N."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import yaml

from qtarget import cli_args
from qtarget.cli import ESSENTIAL_TITLE
from qtarget.cli import main as qtarget_main
from qtarget.evaluation.cli import build_parser as eval_parser
from qtarget.inspect_cmd import build_parser as inspect_parser
from qtarget.lab.cli import build_parser as lab_parser
from qtarget.models import tiny_causal_lm
from qtarget.profile.cli import build_parser as profile_parser
from qtarget.teacher_cache.cli import build_parser as cache_parser
from qtarget.training import train
from qtarget.training.cli import build_parser as train_parser
from qtarget.training.cli import coerce, load_config
from qtarget.training.config import RANGES, QTargetConfig, config_fields
from test_train_support import config, tokenizer, toy_rows

PARSERS = {"train": train_parser, "eval": eval_parser, "profile": profile_parser, "lab": lab_parser,
           "teacher-cache": cache_parser, "inspect": inspect_parser}
# what each command's first help group must list
FIRST = {"train": ["--model", "--dataset", "--objective", "--output_dir"], "eval": ["--model", "--output_dir"],
         "profile": ["--model", "--dataset", "--output_dir"], "lab": ["--model", "--dataset", "--objectives",
                                                                      "--output_dir"],
         "teacher-cache": ["--model", "--dataset", "--teacher_model", "--output_dir"]}


# the required flags of each command, given so a parse reaches the flag under test
REQUIRED = {"eval": ["--model", "m"], "profile": ["--model", "m", "--dataset", "d"]}


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


# ------------------------------------------------------------------------------------ boolean flags
@pytest.mark.parametrize("command", list(PARSERS))
def test_no_command_has_a_flag_that_takes_no_value(command):
    """store_true / store_false flags cannot be written `--flag false`: none are left."""
    parser = PARSERS[command]()
    zero = [a.option_strings[0] for a in _options(parser) if a.nargs == 0]
    assert not zero, zero


@pytest.mark.parametrize("command", list(PARSERS))
def test_every_boolean_flag_takes_three_forms(command):
    parser = PARSERS[command]()
    flags = [a for a in _options(parser) if a.type is cli_args.boolean or a.metavar == "BOOL"]
    assert flags or command == "inspect"
    for action in flags:
        flag = action.option_strings[0]
        for argv, want in (([flag], True), ([flag, "true"], True), ([flag, "false"], False), ([flag, "No"], False),
                           ([flag, "1"], True)):
            ns, _ = parser.parse_known_args(REQUIRED.get(command, []) + argv)
            assert cli_args.parse_bool(getattr(ns, action.dest)) is want, (flag, argv)
        if action.type is cli_args.boolean:
            with pytest.raises(ValueError, match=rf"argument {flag}: expected true or false, got 'maybe'"):
                parser.parse_known_args(REQUIRED.get(command, []) + [flag, "maybe"])
    if command == "teacher-cache":
        assert {"--packing", "--response_only", "--progress", "--resume"} <= {a.option_strings[0] for a in flags}


def test_train_boolean_keys_take_three_forms():
    parser = train_parser()
    fields = config_fields()
    bools = [name for name, f in fields.items() if str(f.type).replace("typing.", "") in ("<class 'bool'>", "bool",
                                                                                       "bool | None")]
    assert {"packing", "use_lora", "plot", "strict_rows", "use_cpu"} <= set(bools)
    for name in bools:
        for argv, want in (([f"--{name}"], True), ([f"--{name}", "true"], True), ([f"--{name}", "false"], False)):
            ns, extra = parser.parse_known_args(argv)
            assert not extra and coerce(name, getattr(ns, name)) is want, (name, argv)
    cfg = load_config(["--output_dir", "o", "--plot", "false", "--packing", "--use_cpu", "true"])
    assert (cfg.plot, cfg.packing, cfg.use_cpu) == (False, True, True)


# ---------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("command", list(PARSERS))
def test_help_lists_the_essentials_first_and_prints_no_double_percent(command):
    parser = PARSERS[command]()
    text = parser.format_help()
    titles = {f"{g.title}:" for g in parser._action_groups}
    assert "%%" not in text
    if command not in FIRST:
        return
    sections = [line for line in text.splitlines() if line in titles]
    options_at = [i for i, s in enumerate(sections) if s in ("options:", "optional arguments:")]
    assert sections[0] == f"{ESSENTIAL_TITLE}:" or (sections[0] == "positional arguments:"
                                                   and sections[1] == f"{ESSENTIAL_TITLE}:"), sections
    first = text.split(f"{ESSENTIAL_TITLE}:", 1)[1].split("\n\n", 1)[0]
    listed = [line.split()[0] for line in first.splitlines() if line.startswith("  --")]
    assert [f for f in listed if f in FIRST[command]] == FIRST[command], listed
    assert options_at and sections.index(f"{ESSENTIAL_TITLE}:") < options_at[0]


# ------------------------------------------------------------------------------- negative numbers
@pytest.mark.parametrize("command", [c for c in PARSERS if c != "train"])
def test_a_negative_number_written_in_e_notation_reaches_its_flag(command):
    """argparse alone reads `-1e-3` as an option ("expected one argument"); every numeric flag gets it
    as its value instead: accepted, or refused by its own range check naming the flag."""
    parser = PARSERS[command]()
    numeric = [a for a in _options(parser) if a.type in (int, float) or getattr(a.type, "__module__", "") ==
               "qtarget.cli_args" and a.type is not cli_args.boolean]
    assert numeric or command == "teacher-cache"
    for action in numeric:
        flag = action.option_strings[0]
        for value in ("-1e-3", "-2E1", "-inf"):
            try:
                ns, _ = parser.parse_known_args(REQUIRED.get(command, []) + [flag, value])
            except ValueError as e:
                assert "expected one argument" not in str(e) and flag in str(e), (flag, value, str(e))
            else:
                assert getattr(ns, action.dest) == float(value), (flag, value)


def test_join_negative_values():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float)
    parser.add_argument("--quiet", action="store_true")
    assert cli_args.join_negative_values(["--lr", "-1e-3", "--quiet", "-5", "--", "--lr", "-1"], parser) == \
        ["--lr=-1e-3", "--quiet", "-5", "--", "--lr", "-1"]
    assert cli_args.join_negative_values(["--lr", "-x"], parser) == ["--lr", "-x"]


def test_train_reads_negative_numbers_and_refuses_them_by_flag():
    cfg = load_config(["--output_dir", "o", "--weight_decay", "1e-3", "--adam_beta1", "0.5"])
    assert (cfg.weight_decay, cfg.adam_beta1) == (1e-3, 0.5)
    for key in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "lora_alpha", "adam_epsilon"):
        with pytest.raises(ValueError, match=rf"^--{key} must be .*got -0.001$"):
            load_config(["--output_dir", "o", f"--{key}", "-1e-3"])


# ---------------------------------------------------------------------------------------- ranges
def _inside(value: float, spec: dict) -> bool:
    """An independent statement of each range (the refusal must match it exactly)."""
    low, high = spec.get("low"), spec.get("high")
    if not math.isfinite(value):
        return False
    if spec.get("integer") and value != int(value):
        return False
    if low is not None and (value <= low if spec.get("low_open") else value < low):
        return False
    if high is not None and (value >= high if spec.get("high_open") else value > high):
        return False
    return True


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_numeric_key_is_refused_outside_its_range_and_accepted_inside(key):
    spec = RANGES[key]
    probes = [-1.0, -1e-3, 0.0, 0.5, 0.999, 1.0, 2.0, 3.0, 100.0, float("nan"), float("inf")]
    fields = config_fields()
    for value in probes:
        typed = int(value) if spec.get("integer") and math.isfinite(value) and value == int(value) else value
        kwargs = {"output_dir": "o", key: typed}
        if key == "num_train_epochs":
            kwargs["max_steps"] = -1
        if "int" in str(fields[key].type) and not spec.get("integer"):
            continue
        try:
            QTargetConfig(**kwargs)
            accepted = True
        except ValueError as e:
            accepted = False
            message = str(e)
        if _inside(float(value), spec) and not (key == "num_train_epochs" and value == 0):
            assert accepted, (key, value, message)
        elif not _inside(float(value), spec):
            assert not accepted, (key, value)
            assert message.startswith(f"--{key} must be"), message


def test_range_errors_read_as_written():
    assert cli_args.range_error(0, 1, integer=True) == "must be >= 1, got 0"
    assert cli_args.range_error(1.0, 0, 1, high_open=True) == "must be in [0, 1), got 1.0"
    assert cli_args.range_error(0.0, 0, low_open=True) == "must be > 0, got 0.0"
    assert cli_args.range_error(float("nan"), 0) == "must be a finite number, got nan"
    assert cli_args.range_error(2.5, 1, integer=True) == "must be an integer, got 2.5"
    assert cli_args.range_error(True, 0) == "must be a number, got True"
    assert cli_args.range_error(0.5, 0, 1) is None
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        cli_args.positive_int("0")
    assert cli_args.positive_int("1e3") == 1000
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, got '1.5'"):
        cli_args.positive_int("1.5")
    assert cli_args.probability("1") == 1.0


def test_objective_args_errors_name_the_flag_and_the_form():
    for text, pattern in (("eta", r"--objective_args: cannot read 'eta' in 'eta': expected key=value pairs"),
                          ("{eta: 0.5", r"--objective_args: cannot read '\{eta: 0.5'"),
                          ("eta=[1", r"--objective_args: cannot read the value of 'eta'"),
                          ("eta=2", r"--objective_args 'eta=2' \(objective 'target_sft'\): .*eta"),
                          ("eta=abc", r"--objective_args 'eta=abc' \(objective 'target_sft'\)")):
        with pytest.raises(ValueError, match=pattern):
            QTargetConfig(output_dir="o", objective="target_sft", objective_args=text)


# -------------------------------------------------------------------------- position limit
def test_max_length_beyond_the_position_limit_is_clamped_with_a_warning(tmp_path, capfd):
    tok = tokenizer()
    model_dir = tmp_path / "model"
    tiny_causal_lm(tok, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=24).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"prompt": "one two three four five six seven eight nine ten " * 2, "response": " alpha beta gamma " * 4}
            for _ in range(4)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"--max_length 4096 is beyond the student model's position limit \(24"):
        rc = qtarget_main(["train", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
                           "--use_cpu", "--disable_tqdm", "--max_steps", "2", "--max_length", "4096", "--plot",
                           "false", "--save_strategy", "no"])
    err = capfd.readouterr().err
    assert rc == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["max_length"] == 24
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_tokenised_rows_longer_than_the_positions_are_refused_naming_the_row(tmp_path):
    tok = tokenizer()
    model = tiny_causal_lm(tok, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    examples = [{"input_ids": list(range(10)), "labels": list(range(10))},
                {"input_ids": list(range(20)), "labels": list(range(20))}]
    with pytest.raises(ValueError, match=r"train_dataset row 1 has 20 tokens, more than max_length 16"):
        train(config(tmp_path / "o", max_length=None), model=model, tokenizer=tok, train_dataset=examples)
    assert not (tmp_path / "o").exists()
    result = train(config(tmp_path / "o", max_length=None, max_steps=1), model=model, tokenizer=tok,
                   train_dataset=toy_rows(8))
    assert result.global_step == 1


# ---------------------------------------------------------------------- messages that say what to fix
def test_an_unreadable_dataset_and_an_unwritable_output_folder_say_what_to_fix(tmp_path, monkeypatch):
    """Permissions cannot be taken from root, so os.access stands in for a file / folder this user cannot use."""
    from qtarget.data import load_rows, sources

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    monkeypatch.setattr(sources.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=r"dataset file '.*rows.jsonl' cannot be read by this user \(permission "
                                              r"denied\): make it readable \(chmod \+r\)"):
        load_rows(str(data))
    monkeypatch.undo()
    monkeypatch.setattr(cli_args.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"--output_dir '.*new/run' cannot be created: '.*' is not writable by this "
                                         r"user; choose a folder you can write to"):
        cli_args.check_output_path(tmp_path / "new" / "run")
    monkeypatch.undo()
    cli_args.check_output_path(tmp_path / "new" / "run")  # writable: nothing raised, nothing created
    assert not (tmp_path / "new").exists()
