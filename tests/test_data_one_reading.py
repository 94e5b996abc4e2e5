"""One reading of a dataset for every command: `train`, `profile`, `teacher-cache`, `lab` (your data) and
`eval --dataset` turn the same file into the same token ids, by default, on chat, prompt/completion
(strings and message lists), Alpaca and ShareGPT files. Each file's tokens are also checked against the
ecosystem's convention, written out independently: TRL does not template a plain-string prompt/completion
(prompt + completion + eos), LLaMA-Factory templates Alpaca rows with the model's own template
(user turn = instruction + "\\n" + input), conversational rows always go through the template."""
from __future__ import annotations

import json

import pytest

from qtarget.data import IGNORE_INDEX, prepare_data, write_jsonl
from qtarget.data.reading import parse_chat_template, prompt_prefix
from qtarget.evaluation.data_file import data_problems
from qtarget.lab.evaldata import tokenize as lab_tokenize
from qtarget.lab.user_task import setup_user_lab
from qtarget.models import tiny_causal_lm
from qtarget.profile import cli as profile_cli
from qtarget.teacher_cache import cli as cache_cli
from qtarget.training import QTargetConfig, train
from qtarget.training.cli import coerce
from qtarget.training.config import config_fields

N = 40
SYSTEM = "Convert units. End with 'The answer is N'."


def _question(i: int) -> tuple[str, str, int]:
    km = i % 9 + 1
    return f"Row {i}: how many metres are {km} km?", f"{km} km = {km} * 1000 m. The answer is {km * 1000}.", km * 1000


def _rows(kind: str) -> list[dict]:
    rows = []
    for i in range(N):
        q, a, n = _question(i)
        if kind == "chat":
            row = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                                {"role": "assistant", "content": a}]}
        elif kind == "pc_strings":
            row = {"prompt": f"{q}\nAnswer:", "completion": f" {a}"}
        elif kind == "pc_messages":
            row = {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        elif kind == "alpaca":
            row = {"instruction": "Convert the length to metres.", "input": q, "output": a}
        elif kind == "sharegpt":
            row = {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": q},
                                     {"from": "gpt", "value": a}]}
        rows.append({**row, "answer": n})
    return rows


def _convention(tok, row: dict) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens) as the ecosystem reads the row, written out independently."""
    if "completion" in row and isinstance(row["prompt"], str):  # TRL standard prompt-completion: no template
        p = tok(row["prompt"])["input_ids"]
        return p + tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id], len(p)
    if "instruction" in row:  # LLaMA-Factory: the model's template, user = instruction + "\n" + input
        turns = [{"role": "user", "content": f"{row['instruction']}\n{row['input']}"}]
        reply = row["output"]
    elif "conversations" in row:
        role = {"system": "system", "human": "user", "gpt": "assistant"}
        turns = [{"role": role[t["from"]], "content": t["value"]} for t in row["conversations"][:-1]]
        reply = row["conversations"][-1]["value"]
    elif "messages" in row:
        turns, reply = row["messages"][:-1], row["messages"][-1]["content"]
    else:
        turns, reply = row["prompt"], row["completion"][0]["content"]
    prompt = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*turns, {"role": "assistant", "content": reply}], tokenize=False)
    return tok(full, add_special_tokens=False)["input_ids"], len(tok(prompt, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from qtarget.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny_model")
    tok = load_tokenizer("smollm2")
    tiny_causal_lm(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _key(example: dict) -> tuple:
    return tuple(example["input_ids"]), tuple(example["labels"])


@pytest.mark.parametrize("kind", ["chat", "pc_strings", "pc_messages", "alpaca", "sharegpt"])
def test_every_command_reads_the_same_tokens(kind, tmp_path, model_folder, monkeypatch, capsys):
    from qtarget.models.load import load_tokenizer

    tok = load_tokenizer(str(model_folder))
    rows = _rows(kind)
    path = str(write_jsonl(rows, tmp_path / f"{kind}.jsonl"))

    # the ecosystem's reading, row by row
    expected = []
    for row in rows:
        ids, n_prompt = _convention(tok, row)
        expected.append((tuple(ids), tuple([IGNORE_INDEX] * n_prompt + ids[n_prompt:])))

    # train: the real training path, one step on the tiny model
    assert config_fields()["chat_template"].default is None  # auto: decided per format
    cfg = QTargetConfig(model=str(model_folder), dataset=path, output_dir=str(tmp_path / "train"), use_cpu=True,
                        disable_tqdm=True, report_to="none", per_device_train_batch_size=4, max_steps=1,
                        save_strategy="no", plot=False, max_length=512)
    result = train(cfg, save_final=False)
    train_examples = [_key(ex) for ex in result.trainer.train_dataset]
    assert train_examples == expected
    templated = kind != "pc_strings"
    line = capsys.readouterr().out
    assert f"({kind_format(kind)}, " in line
    assert ("the tokenizer's chat template" in line) == templated and ("no chat template" in line) != templated

    # profile: its sample of the rows (all of them), default flags
    args = profile_cli.build_parser().parse_args(["--model", str(model_folder), "--dataset", path, "--limit", "0"])
    examples, _, _, data_line, mapped = profile_cli.load_sample(args, tok)
    assert [_key(ex) for ex in examples] == expected and mapped == list(range(N))
    assert data_line.split(") ->")[0] == line.split("data: ")[1].split(") ->")[0]  # the same report line

    # teacher-cache: the examples handed to the cache builder, default flags
    seen = {}
    monkeypatch.setattr(cache_cli, "build_cache", lambda teacher, tokenizer, examples, *a, **k: seen.update(
        examples=list(examples)))
    cache_cli.run(cache_cli.load_options(["--model", str(model_folder), "--teacher_model", str(model_folder),
                                          "--dataset", path, "--output_dir", str(tmp_path / "cache")]))
    assert [_key(ex) for ex in seen["examples"]] == expected
    assert "teacher-cache data: " in capsys.readouterr().err

    # lab on the user's data: the training demonstrations it tokenises, and its generation prompts
    settings, task, _, notes = setup_user_lab(model=str(model_folder), dataset=path, preset="tiny", overrides={})
    assert task.chat_template == templated
    assert any(n.startswith(f"data: {N} rows ({kind_format(kind)}, ") for n in notes)
    by_prompt = {}
    for i, row in enumerate(rows):
        by_prompt[_user_text(row)] = expected[i]
    demos = task.demonstrations(settings.seed, settings.train_examples, 0.0)
    lab_examples = lab_tokenize(tok, demos, settings.max_length, task.instruction, template=task.chat_template)
    assert len(lab_examples) == len(demos) > 0
    for demo, ex in zip(demos, lab_examples):
        assert _key(ex) == by_prompt[demo["prompt"]]
    for problem in task.generation:
        ids, labels = by_prompt[problem.question]
        assert problem.meta["prompt_ids"] == prompt_prefix({"input_ids": ids, "labels": labels})

    # eval --dataset: every row prompted with the tokens training put before its reply
    problems, eval_line = data_problems(path, tok)
    assert len(problems) == N and eval_line.startswith(f"{N} rows ({kind_format(kind)}, ")
    for problem, (ids, labels) in zip(problems, expected):
        n_prompt = next(t for t, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert problem.meta["prompt_ids"] == list(ids[:n_prompt])
        assert problem.answer == str(rows[problem.meta["row"]]["answer"])


def kind_format(kind: str) -> str:
    return {"chat": "messages", "pc_strings": "prompt_completion", "pc_messages": "prompt_completion",
            "alpaca": "alpaca", "sharegpt": "conversations"}[kind]


def _user_text(row: dict) -> str:
    """The prompt the lab keeps for a row (the last user turn; Alpaca: instruction + "\\n" + input; plain: the
    prompt string)."""
    if "messages" in row:
        return row["messages"][-2]["content"]
    if "conversations" in row:
        return row["conversations"][-2]["value"]
    if "instruction" in row:
        return f"{row['instruction']}\n{row['input']}"
    return row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]


def test_an_explicit_choice_reads_the_same_in_every_command(tmp_path, smollm2_tokenizer):
    """`chat_template` true / false means the same everywhere; conversational rows are always templated."""
    tok = smollm2_tokenizer
    rows = _rows("pc_strings")[:6]
    path = str(write_jsonl(rows, tmp_path / "pc.jsonl"))
    forced = prepare_data(path, tok, max_length=None, chat_template=True)
    assert forced.report.templated_rows == 6 and "the tokenizer's chat template" in forced.report.summary()
    turns = [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0]["completion"]}]
    assert forced.train[0]["input_ids"] == tok(tok.apply_chat_template(turns, tokenize=False),
                                               add_special_tokens=False)["input_ids"]
    problems, _ = data_problems(path, tok, chat_template="true")
    assert problems[0].meta["prompt_ids"] == prompt_prefix(forced.train[0])
    plain_alpaca = prepare_data(str(write_jsonl(_rows("alpaca")[:3], tmp_path / "a.jsonl")), tok, max_length=None,
                                chat_template="false")
    assert plain_alpaca.report.templated_rows == 0
    assert tok.decode(plain_alpaca.train[0]["input_ids"]).startswith("Below is an instruction")
    chat = prepare_data(str(write_jsonl(_rows("chat")[:3], tmp_path / "c.jsonl")), tok, max_length=None,
                        chat_template=False)
    assert chat.report.templated_rows == 3  # a chat has no other rendering


def test_alpaca_without_a_template_reads_the_stanford_prompt(tmp_path, gpt2_tokenizer):
    """auto on a tokenizer with no chat template: Alpaca rows fall back to the Stanford Alpaca prompt text."""
    rows = _rows("alpaca")[:3]
    data = prepare_data(str(write_jsonl(rows, tmp_path / "a.jsonl")), gpt2_tokenizer, max_length=None)
    assert data.report.templated_rows == 0 and "no chat template" in data.report.summary()
    text = gpt2_tokenizer.decode(data.train[0]["input_ids"])
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert rows[0]["input"] in text and text.endswith(rows[0]["output"] + gpt2_tokenizer.eos_token)


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", None), (True, True), ("true", True),
                                             ("False", False), ("off", False), ("none", None)])
def test_chat_template_values(value, expected):
    assert parse_chat_template(value) is expected


def test_chat_template_bad_value_names_the_flag():
    with pytest.raises(ValueError, match="--chat_template: expected auto, true or false"):
        parse_chat_template("sometimes")
    with pytest.raises(ValueError, match="--chat_template"):
        coerce("chat_template", "maybe")
    assert coerce("chat_template", "auto") is None and coerce("chat_template", "true") is True


def test_eval_dataset_flag_runs_on_a_training_file(tmp_path, model_folder, capsys):
    """`qtarget eval --dataset FILE`: the rows of a training file, graded against their answer column."""
    from qtarget.cli import main as qtarget_main

    path = str(write_jsonl(_rows("pc_strings")[:5], tmp_path / "pc.jsonl"))
    out = tmp_path / "eval"
    rc = qtarget_main(["eval", "--model", str(model_folder), "--dataset", path, "--limit", "3", "--max_new_tokens", "2",
                       "--output_dir", str(out), "--no_progress"])
    assert rc == 0
    assert "eval data: 5 rows (prompt_completion, no chat template) -> 5 problems" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in records] == [str(r["answer"]) for r in _rows("pc_strings")[:3]]
