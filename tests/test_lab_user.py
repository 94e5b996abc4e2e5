"""`qtarget lab --model M --dataset D`: the user's rows as a LabTask (formats, answers, disjoint split,
planted noise, ranking distractors, the teacher's own part) and the lab end to end on a tiny saved model
with a jsonl that has an answer column."""
from __future__ import annotations

import json
import random

import pytest

from qtarget.cli import main as qtarget_main
from qtarget.data import write_jsonl
from qtarget.evaluation import Problem
from qtarget.lab.settings import settings_for
from qtarget.lab.teacher import TEACHER_DATA_SEED
from qtarget.lab.user_task import corrupt, load_pairs, near_miss, plan_split, setup_user_lab, user_task
from qtarget.models import tiny_causal_lm


def arithmetic_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 2, i % 5 + 3
        rows.append({"prompt": f"Q{i}: what is {a} times {b}?", "response": f"{a} * {b} = {a * b}. The answer is "
                                                                            f"{a * b}.", "answer": a * b})
    return rows


def test_load_pairs_reads_every_chat_format_and_answers(tmp_path):
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "#### 4"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "3+4?"},
                          {"role": "assistant", "content": "It is 7."}]}]
    pairs, instruction = load_pairs(write_jsonl(chat, tmp_path / "chat.jsonl"))
    assert instruction == "Be brief."  # shared system turn -> the task's instruction
    assert [(p.prompt, p.response, p.answer) for p in pairs] == [("2+2?", "#### 4", "4"), ("3+4?", "It is 7.", None)]
    completion = [{"prompt": "x?", "completion": "The answer is $1,000.", "answer": "1,000"},
                  {"prompt": "y?", "completion": "no idea"}]
    pairs, instruction = load_pairs(write_jsonl(completion, tmp_path / "pc.jsonl"))
    assert instruction is None and [p.answer for p in pairs] == ["1000", None]
    with pytest.raises(ValueError, match="plain `text` rows"):
        load_pairs(write_jsonl([{"text": "abc"}], tmp_path / "t.jsonl"))


def test_corrupt_replaces_the_last_answer_occurrence_only():
    rng = random.Random(0)
    wrong = corrupt("3 * 4 = 12. So 12 it is; 120 is not. The answer is 12.", "12", rng)
    assert wrong.startswith("3 * 4 = 12. So 12 it is; 120 is not. The answer is ") and not wrong.endswith(" 12.")
    assert corrupt("The answer is 1,200.", "1200", rng) is None  # written with a separator: left alone
    assert corrupt("It is seven.", "7", rng) is None and corrupt("ok", None, rng) is None


def test_near_miss_replaces_every_answer_occurrence_with_a_near_slip():
    """The ranking distractor: every occurrence of the answer (not a longer number containing it) becomes one
    near miss, ±2 first, then ±1, ±3; decimals slip in their last place; a non-negative answer stays >= 0."""
    rng = random.Random(0)
    text = "3 * 4 = 12. So 12 it is; 120 is not. The answer is 12."
    first, n1 = near_miss(text, "12", rng)
    assert n1 in ("10", "14") and first == text.replace(" 12.", f" {n1}.").replace("So 12 ", f"So {n1} ")
    assert "120 is not" in first
    second, n2 = near_miss(text, "12", rng, taken=["12", n1])
    assert {n1, n2} == {"10", "14"}
    _, n3 = near_miss(text, "12", rng, taken=["12", "10", "14"])
    assert n3 in ("11", "13")
    assert near_miss("so 1 - 1 = 0. The answer is 0.", "0", rng)[1] == "2"
    assert near_miss("The answer is 1,200.", "1200", rng) is None  # written with a separator: left alone
    assert near_miss("It is seven.", "7", rng) is None and near_miss("ok", None, rng) is None
    assert near_miss("half of 5 is 2.5. The answer is 2.5.", "2.5", rng)[1] in ("2.3", "2.7")


def test_split_is_disjoint_and_noise_is_planted_as_asked(tmp_path, smollm2_tokenizer):
    pairs, instruction = load_pairs(write_jsonl(arithmetic_rows(60), tmp_path / "d.jsonl"))
    settings = settings_for("tiny", noise=0.5, train_examples=20)
    split = plan_split(pairs, settings, own_teacher=True)
    parts = [split.ranking, split.generation, split.teacher, split.pool]
    assert sum(map(len, parts)) == 60 and len(set().union(*map(set, parts))) == 60
    task = user_task(settings, pairs, instruction, split, name="d.jsonl", tokenizer=smollm2_tokenizer)
    assert {item["id"] for item in task.ranking} == {f"row{pairs[i].index}" for i in split.ranking}
    for item in task.ranking:  # the correct demonstration first, distinct consistent near-miss distractors
        assert len(set(item["candidates"])) == 1 + settings.rank_distractors
        correct = item["candidates"][0]
        answer = next(pairs[i].answer for i in split.ranking if f"row{pairs[i].index}" == item["id"])
        if answer is not None and answer in correct:
            for wrong in item["candidates"][1:]:
                assert wrong.count(answer) < correct.count(answer) and len(wrong) >= len(correct) - 2
    assert [p.answer for p in task.generation] == [pairs[i].answer for i in split.generation]
    rows = task.demonstrations(3, 20, 0.5)
    assert rows == task.demonstrations(3, 20, 0.5)  # seeded
    pool_prompts = {pairs[i].prompt for i in split.pool}
    assert {r["prompt"] for r in rows} <= pool_prompts
    noisy = [r for r in rows if r["noise"] == "corrupt"]
    assert len(noisy) == 10 and all(r["response"] != r["clean_response"] for r in noisy)
    assert all("counterfactual_response" in r for r in rows if r["noise"] == "clean")
    assert all(r["noise"] == "clean" for r in task.demonstrations(3, 20, 0.0))
    teacher_rows = task.demonstrations(TEACHER_DATA_SEED, 100, 0.0)
    assert {r["prompt"] for r in teacher_rows} == {pairs[i].prompt for i in split.teacher}
    assert task.is_correct("so The answer is 12.", Problem(id="x", question="q", answer="12", source="t"))
    assert not task.is_correct("so The answer is 13.", Problem(id="x", question="q", answer="12", source="t"))


def test_split_refuses_data_without_answers_or_too_small(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(30)]
    pairs, _ = load_pairs(write_jsonl(rows, tmp_path / "d.jsonl"))
    with pytest.raises(ValueError, match="checkable answer"):
        plan_split(pairs, settings_for("tiny"), own_teacher=False)
    pairs, _ = load_pairs(write_jsonl(arithmetic_rows(4), tmp_path / "s.jsonl"))
    with pytest.raises(ValueError, match="remain for training"):
        plan_split(pairs, settings_for("tiny", batch_size=4), own_teacher=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from qtarget.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny_model")
    tok = load_tokenizer("smollm2")
    tiny_causal_lm(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_setup_scales_defaults_and_sizes_to_the_data(tmp_path, tiny_folder):
    data = write_jsonl(arithmetic_rows(40), tmp_path / "d.jsonl")
    settings, task, teacher, notes = setup_user_lab(model=str(tiny_folder), dataset=str(data), preset="default",
                                                    overrides={"objectives": ("sft", "target_sft")})
    assert settings.model == str(tiny_folder) and settings.noise == 0.0 and teacher is None
    assert settings.train_top_layers == 1 and settings.batch_size == 8  # 2 layers, a tiny model
    assert settings.eval_in_domain == len(task.generation) <= 8 and settings.rank_items == len(task.ranking) == 8
    assert settings.teacher_examples == 10  # a quarter of the rows, disjoint from the rest
    assert any("parameters" in n for n in notes)


def test_lengths_fit_the_model_positions(tmp_path):
    """A model with few positions: --max_length is clamped to them (noted, as `qtarget train` clamps it), and
    the generation budget to what the longest generation prompt leaves; a prompt that fills them is refused."""
    from qtarget.models import load_tokenizer

    folder = tmp_path / "short"
    tok = load_tokenizer("smollm2")
    tiny_causal_lm(tok, seed=0, max_position_embeddings=40).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = write_jsonl(arithmetic_rows(40), tmp_path / "d.jsonl")
    settings, task, _, notes = setup_user_lab(model=str(folder), dataset=str(data), preset="tiny",
                                              overrides={"objectives": ("sft",), "max_length": 512,
                                                         "max_new_tokens": 64})
    assert settings.max_length == 40 and any("--max_length 512 → 40" in n for n in notes)
    longest_prompt = max(len(p.meta["prompt_ids"]) for p in task.generation)
    assert settings.max_new_tokens == 40 - longest_prompt < 64
    assert any(f"--max_new_tokens 64 → {40 - longest_prompt}" in n for n in notes)
    long_rows = [{"prompt": "Q: " + "what is this " * 20 + "?", "response": "12. The answer is 12.", "answer": 12}] * 40
    with pytest.raises(ValueError, match="no row fits --max_length 40"):
        setup_user_lab(model=str(folder), dataset=str(write_jsonl(long_rows, tmp_path / "long.jsonl")), preset="tiny",
                       overrides={"objectives": ("sft",)})


def test_lab_on_user_model_and_data_end_to_end(tmp_path, tiny_folder, capsys):
    data = write_jsonl(arithmetic_rows(40), tmp_path / "d.jsonl")
    out = tmp_path / "out"
    rc = qtarget_main(["lab", "--tiny", "--model", str(tiny_folder), "--dataset", str(data), "--objectives",
                       "sft,dft", "--noise", "0.3", "--steps", "2", "--ood_texts", "4", "--n_boot", "100",
                       "--output_dir", str(out), "--no_progress"])
    assert rc == 0
    everything = json.loads((out / "results.json").read_text())
    assert everything["tasks"] == ["user:d.jsonl"]
    results = everything["per_task"]["user:d.jsonl"]
    assert results["data"]["task"]["name"] == "user:d.jsonl"
    assert everything["model"]["model_id"].startswith("folder:")
    assert set(results["rows"]) == {"base", "sft", "dft"}
    items = results["items"]["sft"]
    assert len(items["gen.correct"][0]) == everything["settings"]["eval_in_domain"] > 0
    assert len(items["rank.nll"][0]) == everything["settings"]["rank_items"]
    assert "noise.corrupt" in items  # --noise planted corrupted answers; noise fit measured them
    assert results["vs_reference"]["dft"]  # paired differences from sft
    report = (out / "report.md").read_text()
    assert "your demonstrations (d.jsonl" in report and (out / "effects_user_d.jsonl.png").exists()
    # every ranking item's distractors are near misses of its answer, and the report says so with their count
    n_items = everything["settings"]["rank_items"]
    assert results["data"]["rank"]["distractor_kinds"] == {"near miss": 2 * n_items}
    assert f"distractors: every occurrence of the answer off by 2 (then 1, 3, ...) ({2 * n_items})" in report


def test_lab_user_bad_input_one_line(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(30)]
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    rc = qtarget_main(["lab", "--tiny", "--dataset", str(data), "--output_dir", str(tmp_path / "o"), "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("qtarget lab: error: ") and "checkable answer" in err[-1]
    rc = qtarget_main(["lab", "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and "--model must be" in capsys.readouterr().err
