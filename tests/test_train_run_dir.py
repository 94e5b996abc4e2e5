"""One folder, one run: a new run into another run's output_dir is refused unless --resume or
--overwrite_output_dir (which clears the old outputs); --resume refuses a checkpoint trained on other data
or settings, naming what differs; settings that would be ignored (a teacher the objective does not read, a
--teacher_model that is not the --teacher_cache's teacher) are refused before anything loads."""
from __future__ import annotations

import json

import pytest
import yaml

from qtarget.cli import main as qtarget_main
from qtarget.data import prepare_data
from qtarget.teacher_cache import build_cache
from qtarget.training import train
from qtarget.training.run_dir import RUN_FILE, read_fingerprint, rows_digest
from test_train_support import config, tiny, tokenizer, toy_rows


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A local model folder and two data files (the second differs in one row)."""
    root = tmp_path_factory.mktemp("cli")
    tok = tokenizer()
    tiny().save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = toy_rows(8)
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[3] = {**rows[3], "response": rows[3]["response"] + " changed"}
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def cli(root, out, *extra: str, data: str = "a.jsonl") -> list[str]:
    return ["train", "--model", str(root / "model"), "--dataset", str(root / data), "--objective", "dft",
            "--output_dir", str(out), "--use_cpu", "--disable_tqdm", "--report_to", "none", "--max_length", "48",
            "--per_device_train_batch_size", "4", "--save_steps", "2", "--max_steps", "2", "--plot", "false", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("qtarget train: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_rerun_into_a_finished_run_is_refused_and_overwrite_clears_it(cli_setup, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "out").mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file: not a run output
    assert qtarget_main(cli(cli_setup, out)) == 0
    assert (out / "checkpoint-2").is_dir() and (out / RUN_FILE).is_file()
    assert (out / "checkpoint-2" / RUN_FILE).is_file()  # each checkpoint carries the run's fingerprint
    before = (out / "metrics.jsonl").read_text()

    assert qtarget_main(cli(cli_setup, out, "--learning_rate", "0.5")) == 2
    line = one_error_line(capsys)
    assert "already holds a training run" in line and "checkpoint-2" in line and "--overwrite_output_dir" in line
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched

    (out / "checkpoint-7").mkdir()  # a stale checkpoint the new run does not write: must go too
    assert qtarget_main(cli(cli_setup, out, "--learning_rate", "0.5", "--max_steps", "1",
                            "--overwrite_output_dir")) == 0
    assert not (out / "checkpoint-2").exists() and not (out / "checkpoint-7").exists()
    assert (out / "notes.txt").read_text() == "mine"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 0.5


def test_resume_refuses_another_runs_checkpoint(cli_setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert qtarget_main(cli(cli_setup, out)) == 0
    # other data (one row differs), other settings: refused, naming what differs
    assert qtarget_main(cli(cli_setup, out, "--resume", "--max_steps", "4", data="b.jsonl")) == 2
    line = one_error_line(capsys)
    assert "checkpoint-2 belongs to a run with other data or settings" in line and "training data fingerprint" in line
    assert qtarget_main(cli(cli_setup, out, "--resume", "--max_steps", "4", "--learning_rate", "0.5")) == 2
    assert "learning_rate: 5e-05 there, 0.5 now" in one_error_line(capsys)
    assert qtarget_main(cli(cli_setup, out, "--resume", "--max_steps", "4", "--objective", "sft")) == 2
    assert "objective: 'dft' there, 'sft' now" in one_error_line(capsys)
    # a resume from a checkpoint folder of another output_dir is checked the same way
    other = tmp_path / "other"
    assert qtarget_main(cli(cli_setup, other, "--resume", str(out / "checkpoint-2"), "--max_steps", "4",
                            "--seed", "3")) == 2
    assert "seed: 42 there, 3 now" in one_error_line(capsys)
    # the same run extended to more steps resumes
    assert qtarget_main(cli(cli_setup, out, "--resume", "--max_steps", "4")) == 0
    assert (out / "checkpoint-4").is_dir()


def test_resume_without_a_checkpoint_is_one_line(cli_setup, tmp_path, capsys):
    assert qtarget_main(cli(cli_setup, tmp_path / "empty", "--resume")) == 2
    assert "no checkpoint-N folder" in one_error_line(capsys)
    assert qtarget_main(cli(cli_setup, tmp_path / "x", "--resume", str(tmp_path / "nope"))) == 2
    assert "does not exist" in one_error_line(capsys)


def test_a_failed_start_of_the_same_run_does_not_block_a_rerun(tmp_path):
    """A run that died before its first step left only config.yaml and its fingerprint: the same command
    starts again; another run is still refused."""
    tok = tokenizer()
    data = prepare_data(toy_rows(8), tok, max_length=48)
    train(config(tmp_path, max_steps=1), model=tiny(), tokenizer=tok, train_dataset=data.train, save_final=False)
    fingerprint = read_fingerprint(tmp_path)
    for name in ("metrics.jsonl", "metrics.csv"):
        (tmp_path / name).unlink()
    train(config(tmp_path, max_steps=1), model=tiny(), tokenizer=tok, train_dataset=data.train, save_final=False)
    assert read_fingerprint(tmp_path) == fingerprint
    with pytest.raises(ValueError, match="already holds a training run"):
        train(config(tmp_path, max_steps=1, seed=1), model=tiny(), tokenizer=tok, train_dataset=data.train)


def test_ignored_teacher_settings_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--teacher_model would be ignored: objective 'dft' uses no teacher"):
        train(config(tmp_path, objective="dft", teacher_model="some/teacher"), model=tiny(), tokenizer=tokenizer(),
              train_dataset=toy_rows(4))
    with pytest.raises(ValueError, match=r"--ref_model would be ignored: objective 'sft' uses no reference model"):
        train(config(tmp_path, objective="sft", ref_model="some/base"), model=tiny(), tokenizer=tokenizer(),
              train_dataset=toy_rows(4))
    assert not (tmp_path / "config.yaml").exists()


def test_teacher_model_must_be_the_teacher_cache_teacher(tmp_path, capsys):
    tok = tokenizer()
    rows = toy_rows(6)
    data = prepare_data(rows, tok, max_length=48)
    teacher_dir = tmp_path / "teacher"
    tiny(seed=1).save_pretrained(teacher_dir)
    build_cache(tiny(seed=1), tok, data.train, tmp_path / "cache", top_k=8, progress=False,
                settings={"max_length": 48}, teacher_name=str(teacher_dir))
    common = dict(objective="target_sft", teacher_cache=str(tmp_path / "cache"), max_steps=1, max_length=48)
    with pytest.raises(ValueError, match=r"--teacher_model 'other/teacher' is not the teacher of --teacher_cache .*"
                                         r"manifest records '.*teacher'"):
        train(config(tmp_path / "a", teacher_model="other/teacher", **common), model=tiny(), tokenizer=tok,
              train_dataset=rows)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    # the cache's own teacher, named by another spelling of the same folder, agrees
    same = str(tmp_path / "cache" / ".." / "teacher")
    result = train(config(tmp_path / "b", teacher_model=same, **common), model=tiny(), tokenizer=tok,
                   train_dataset=rows, save_final=False)
    assert result.global_step == 1
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["teacher_model"] == same


def test_rows_digest_sees_every_tokenised_field():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    base = rows_digest(rows)
    assert base["rows"] == 2 and rows_digest([dict(r) for r in rows]) == base
    changed = [
        rows[::-1],  # order
        [rows[0], {"input_ids": [4, 6], "labels": [-100, 6]}],  # a token
        [rows[0], {"input_ids": [4, 5], "labels": [-100, -100]}],  # what is supervised
        [rows[0], {**rows[1], "token_weights": [1.0, 0.5]}],  # per-token weights
        rows[:1],  # a row fewer
    ]
    assert all(rows_digest(c) != base for c in changed)
    assert rows_digest(iter(rows)) == {}  # a stream: nothing to compare
