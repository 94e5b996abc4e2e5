"""Format failures on your data mean what they say: the lab learns the answer form from the
demonstrations (The answer is N, \\boxed{N}, #### N, or none: an answer column only), a response fails
the format when it states no answer in that form (a bare number does not count), and with no form the
metric is absent and the report says why. Planted responses for each form, a planted model that never /
always states the answer, and a lab run on a tiny model whose base model never states one."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qtarget.cli import main as qtarget_main
from qtarget.data import write_jsonl
from qtarget.evaluation.answers import answer_form, normalize_answer, stated_answer
from qtarget.evaluation.generation import Sample
from qtarget.lab import analysis
from qtarget.lab.metrics import generation_items
from qtarget.lab.settings import settings_for
from qtarget.lab.user_task import answer_form_of, load_pairs, plan_split, user_task

STATE = {"answer_is": "The answer is {n}.", "boxed": "So the result is \\boxed{{{n}}}.", "hashes": "#### {n}",
         None: "That makes {n} in total."}
OTHER = {"answer_is": "boxed", "boxed": "hashes", "hashes": "answer_is"}


def rows(form: str | None, n: int = 40) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 7 + 2, i % 5 + 3
        out.append({"prompt": f"Q{i}: what is {a} times {b}?",
                    "response": f"{a} * {b} = {a * b}. " + STATE[form].format(n=a * b), "answer": a * b})
    return out


@pytest.mark.parametrize("form", ["answer_is", "boxed", "hashes"])
def test_each_form_is_read_only_in_its_own_form(form):
    stated = STATE[form].format(n=12)
    assert answer_form(stated) == form and normalize_answer(stated_answer(stated, form)) == "12"
    elsewhere = STATE[OTHER[form]].format(n=12)
    assert stated_answer(elsewhere, form) is None  # stated, but in another form
    assert stated_answer("3 * 4 = 12.", form) is None  # a bare number states nothing
    assert answer_form("3 * 4 = 12.") is None


@pytest.fixture(scope="module")
def tokenizer():
    from qtarget.models import load_tokenizer

    return load_tokenizer("smollm2")


def task_of(form, tmp_path, tokenizer, n: int = 40):
    pairs, instruction = load_pairs(write_jsonl(rows(form, n), tmp_path / f"{form}.jsonl"), tokenizer=tokenizer)
    settings = settings_for("tiny")
    return user_task(settings, pairs, instruction, plan_split(pairs, settings, own_teacher=False),
                     name="d.jsonl", tokenizer=tokenizer)


class PlantedGenerator:
    """A 'model' whose greedy answer to each prompt is chosen by `respond(problem)`; prompts are matched to
    problems by their token ids (so this also checks the lab prompts with the problem's own tokens)."""

    def __init__(self, problems, respond):
        self.by_prompt = {tuple(p.meta["prompt_ids"]): p for p in problems}
        self.respond = respond

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
        out = []
        for ids in prompts:
            text = self.respond(self.by_prompt[tuple(ids)])
            out.append(Sample(text=text, token_ids=[1, 2], num_tokens=2, cut=False, entropy=None))
        return out


def planted_items(task, tokenizer, monkeypatch, respond):
    monkeypatch.setattr("qtarget.evaluation.runner.HFGenerator",
                        lambda model, tok, batch_size: PlantedGenerator(task.generation, respond))
    return generation_items(object(), tokenizer, task, max_new_tokens=8, batch_size=4, seed=0)


@pytest.mark.parametrize("form", ["answer_is", "boxed", "hashes"])
def test_planted_models_for_each_form(form, tmp_path, tokenizer, monkeypatch):
    task = task_of(form, tmp_path, tokenizer)
    assert task.answer_form == form and "format failure" in task.format_note
    n = len(task.generation)
    cases = {  # response -> (expected format failures, expected accuracy)
        "never states": (lambda p: f"I think it is {p.answer}, maybe.", 1.0, 0.0),
        "always states": (lambda p: STATE[form].format(n=p.answer), 0.0, 1.0),
        "states in another form": (lambda p: STATE[OTHER[form]].format(n=p.answer), 1.0, 0.0),
        "states a wrong answer": (lambda p: STATE[form].format(n=int(p.answer) + 1), 0.0, 0.0),
    }
    for name, (respond, fails, accuracy) in cases.items():
        items = planted_items(task, tokenizer, monkeypatch, respond)
        assert items["no_answer"].shape == (n,) and float(items["no_answer"].mean()) == fails, name
        assert float(items["correct"].mean()) == accuracy, name
    # every other response states it: the share is counted per problem
    half = planted_items(task, tokenizer, monkeypatch,
                         lambda p: STATE[form].format(n=p.answer) if int(p.id[3:]) % 2 else f"{p.answer}")
    expected = np.mean([int(p.id[3:]) % 2 == 0 for p in task.generation])
    assert float(half["no_answer"].mean()) == pytest.approx(expected)


def test_no_form_in_the_demonstrations_means_no_format_metric(tmp_path, tokenizer, monkeypatch):
    task = task_of(None, tmp_path, tokenizer)
    assert task.answer_form is None
    assert "format failures not measured" in task.format_note and "format failures not measured" in task.description
    items = planted_items(task, tokenizer, monkeypatch, lambda p: f"It is {p.answer}.")
    assert "no_answer" not in items
    assert float(items["correct"].mean()) == 1.0  # accuracy may take the last number (docs/lab.md)
    per_item = {"base": {f"gen.{k}": np.asarray([v]) for k, v in items.items() if k != "responses"}}
    est = analysis.summarize(per_item, n_boot=100, seed=0)["estimates"]["base"]
    assert "gen_acc" in est and "format_fail" not in est


def test_the_form_is_the_one_most_demonstrations_use(tmp_path, tokenizer):
    mixed = rows("boxed", 10)[:6] + rows("hashes", 10)[6:]
    pairs, _ = load_pairs(write_jsonl(mixed, tmp_path / "m.jsonl"), tokenizer=tokenizer)
    form, note = answer_form_of(pairs)
    assert form == "boxed" and "6 of 10" in note
    few = rows(None, 10)[:7] + rows("answer_is", 10)[7:]
    pairs, _ = load_pairs(write_jsonl(few, tmp_path / "f.jsonl"), tokenizer=tokenizer)
    form, note = answer_form_of(pairs)
    assert form is None and "3 of 10 demonstrations" in note


def test_lab_on_a_tiny_model_base_never_states_the_answer(tmp_path):
    """A random tiny model never writes 'The answer is N', though its output may hold numbers: its format
    failures are 1.0 (the last-number rule used to read them as 0)."""
    data = write_jsonl(rows("answer_is", 40), tmp_path / "d.jsonl")
    out = tmp_path / "out"
    rc = qtarget_main(["lab", "--tiny", "--dataset", str(data), "--objectives", "sft", "--steps", "1",
                       "--ood_texts", "4", "--n_boot", "100", "--max_new_tokens", "24", "--output_dir", str(out),
                       "--no_progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())["per_task"]["user:d.jsonl"]
    base = np.asarray(results["items"]["base"]["gen.no_answer"])
    assert base.size > 0 and float(base.mean()) == 1.0
    assert results["estimates"]["base"]["format_fail"]["value"] == 1.0
    assert "format failure = a response that states no final answer as 'The answer is X'" in (
        out / "report.md").read_text()
