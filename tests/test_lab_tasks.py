"""The lab's task generators, noise injection and answer checker, against independent computation."""
from __future__ import annotations

import re

import pytest

from qtarget.lab import tasks
from qtarget.lab.runner import checkpoint_steps
from qtarget.lab.settings import LabSettings, settings_for

NUM = r"(-?\d+)"
STEP_SYMBOLS = re.compile(rf"{NUM} ?([+\-*]) ?{NUM} ?= ?{NUM}[.;]")   # spaced (shop, sum) or compact (glyph)
STEP_WORDS = re.compile(rf"{NUM} (plus|minus|times) {NUM} is {NUM}\.")


def answer_from_question(question: str) -> int:
    """Independent reading of a shop question: parse each sentence and compute the total."""
    total = None
    for sentence in re.split(r"(?<=[.?])\s+", question):
        if m := re.fullmatch(r"\w+ has (\d+) [\w ]+\.", sentence):
            total = int(m.group(1))
        elif m := re.fullmatch(r"(?:Then )?\w+ (?:buys|finds) (\d+) more\.", sentence):
            total += int(m.group(1))
        elif m := re.fullmatch(r"(?:Then )?\w+ gives away (\d+)\.", sentence):
            total -= int(m.group(1))
        elif m := re.fullmatch(r"(?:Then )?\w+ gets (\d+) \w+ with (\d+) [\w ]+ in each\.", sentence):
            total += int(m.group(1)) * int(m.group(2))
        elif sentence.startswith("How many"):
            continue
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")
    return total


def glyph_answer(question: str) -> int:
    """Independent reading of a glyph question: x ◇ b = 2x + b, left to right."""
    m = re.fullmatch(r"What is (\d+(?: ◇ \d+)+)\?", question)
    assert m, question
    numbers = [int(x) for x in m.group(1).split(" ◇ ")]
    total = numbers[0]
    for b in numbers[1:]:
        total = 2 * total + b
    return total


def sum_answer(question: str) -> int:
    m = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question)
    assert m, question
    a, b = int(m.group(1)), int(m.group(3))
    return a + b if m.group(2) == "+" else a - b


# every built-in generator and an independent reading of its questions
GENERATORS = {"shop": (tasks.shop_problems, answer_from_question), "sum": (tasks.sum_problems, sum_answer),
              "glyph": (tasks.glyph_problems, glyph_answer)}


def written_steps(response: str) -> list[tuple[int, str, int, int]]:
    ops = {"plus": "+", "minus": "-", "times": "*"}
    out = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP_SYMBOLS.findall(response)]
    out += [(int(a), ops[op], int(b), int(c)) for a, op, b, c in STEP_WORDS.findall(response)]
    return out


def evaluate_step(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


@pytest.mark.parametrize("name", GENERATORS)
def test_answers_match_an_independent_parse(name):
    generate, read = GENERATORS[name]
    problems = generate(300, 3)
    for p in problems:
        assert read(p.question) == p.answer, p.question
        assert p.answer >= 0
        assert p.prompt == p.question
        assert p.id.startswith(f"{name}/")
    assert len({p.question for p in problems}) > 100   # room for held-out sets and training rows apart


@pytest.mark.parametrize("name", GENERATORS)
def test_clean_demonstrations_are_correct_step_by_step(name):
    rows = tasks.demonstrations(GENERATORS[name][0](200, 5), noise=0.0, seed=5)
    for r in rows:
        steps = written_steps(r["response"])
        assert steps, r["response"]
        assert all(evaluate_step(a, op, b) == c for a, op, b, c in steps), r["response"]
        assert steps[-1][3] == r["answer"]
        assert r["response"].endswith(f"The answer is {r['answer']}.")
        assert tasks.is_correct(r["response"], r["answer"])


def test_glyph_demonstrations_write_the_rule_in_compact_notation():
    """x ◇ b is written as two compact steps 2*x=.. ; ..+b=.. (no spaces, ';' between steps)."""
    for p in tasks.glyph_problems(100, 6):
        numbers = [int(x) for x in p.question[len("What is "):-1].split(" ◇ ")]
        text = tasks.solution_text(p.steps, p.answer, style=p.style)
        expected, total = [], numbers[0]
        for b in numbers[1:]:
            expected += [f"2*{total}={2 * total}", f"{2 * total}+{b}={2 * total + b}"]
            total = 2 * total + b
        assert text == ";".join(expected) + f". The answer is {total}."


@pytest.mark.parametrize("name", GENERATORS)
def test_noise_share_and_kinds(name):
    n = 400
    for noise in (0.0, 0.2, 0.5, 1.0):
        rows = tasks.demonstrations(GENERATORS[name][0](n, 1), noise=noise, seed=1)
        kinds = [r["noise"] for r in rows]
        noisy = sum(k != "clean" for k in kinds)
        assert noisy == round(noise * n)
        assert abs(kinds.count("corrupt") - kinds.count("alternative")) <= 1


@pytest.mark.parametrize("name", GENERATORS)
def test_corrupted_demonstrations_have_exactly_one_wrong_step_and_a_wrong_answer(name):
    rows = tasks.demonstrations(GENERATORS[name][0](300, 2), noise=1.0, seed=2)
    corrupt = [r for r in rows if r["noise"] == "corrupt"]
    assert len(corrupt) == 150
    for r in corrupt:
        steps = written_steps(r["response"])
        wrong = [i for i, s in enumerate(steps) if evaluate_step(*s[:3]) != s[3]]
        assert len(wrong) == 1, r["response"]
        # the same steps as the clean solution up to the wrong one; later steps compute from the wrong value
        clean = written_steps(r["clean_response"])
        assert steps[:wrong[0]] == clean[:wrong[0]] and len(steps) == len(clean)
        assert r["stated_answer"] != r["answer"] and steps[-1][3] == r["stated_answer"]
        assert tasks.extract_final(r["response"]) == r["stated_answer"]
        assert not tasks.is_correct(r["response"], r["answer"])


@pytest.mark.parametrize("name", GENERATORS)
def test_alternative_forms_are_correct_but_differ_from_the_clean_text(name):
    problems = GENERATORS[name][0](200, 4)
    clean = {r["id"]: r["response"] for r in tasks.demonstrations(problems, noise=0.0, seed=4)}
    rows = tasks.demonstrations(problems, noise=1.0, seed=4)
    alternative = [r for r in rows if r["noise"] == "alternative"]
    assert alternative
    for r in alternative:
        assert r["response"] != clean[r["id"]] and r["clean_response"] == clean[r["id"]]
        steps = written_steps(r["response"])
        # the same equations (operands maybe swapped), every one right, the same answer
        assert sorted(map(sorted, ((a, b) for a, _, b, _ in steps))) == sorted(
            map(sorted, ((a, b) for a, _, b, _ in written_steps(clean[r["id"]]))))
        assert all(evaluate_step(a, op, b) == c for a, op, b, c in steps), r["response"]
        assert tasks.is_correct(r["response"], r["answer"])


def test_generators_are_deterministic_by_seed_and_differ_across_seeds():
    a = tasks.demonstrations(tasks.shop_problems(50, seed=7), noise=0.3, seed=7)
    b = tasks.demonstrations(tasks.shop_problems(50, seed=7), noise=0.3, seed=7)
    c = tasks.demonstrations(tasks.shop_problems(50, seed=8), noise=0.3, seed=8)
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    assert [p.question for p in tasks.convert_problems(20, 1)] == [p.question for p in tasks.convert_problems(20, 1)]
    # a prefix of a longer draw is the shorter draw (held-out sets are prefixes of the eval set)
    assert [p.question for p in tasks.shop_problems(10, 9)] == [p.question for p in tasks.shop_problems(30, 9)[:10]]


def test_convert_answers():
    factors = {("minutes", "hours"): 60, ("seconds", "minutes"): 60, ("hours", "days"): 24, ("days", "weeks"): 7,
               ("months", "years"): 12, ("centimeters", "meters"): 100, ("grams", "kilograms"): 1000,
               ("meters", "kilometers"): 1000, ("eggs", "dozens"): 12, ("cents", "dollars"): 100}
    for p in tasks.convert_problems(200, seed=0):
        m = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", p.question)
        assert m, p.question
        assert p.answer == int(m.group(2)) * factors[(m.group(1), m.group(3))]


@pytest.mark.parametrize("response, expected", [
    ("3 + 4 = 7. The answer is 7.", 7),
    ("The answer is 12. Wait, 3 * 5 = 15. The answer is 15.", 15),
    ("So the answer is 1,200.", 1200),
    ("the answer is: -4", -4),
    ("12 + 3 = 15", 15),             # no phrase: last number
    ("\\boxed{42}", 42),
    ("The answer is 7.5.", None),    # not an integer
    ("no numbers here", None),
    ("", None),
])
def test_extract_final(response, expected):
    assert tasks.extract_final(response) == expected


def test_is_correct_is_exact():
    assert tasks.is_correct("5 * 60 = 300. The answer is 300.", 300)
    assert not tasks.is_correct("5 * 60 = 300. The answer is 301.", 300)
    assert not tasks.is_correct("The answer is 300 but the answer is 30.", 300)
    with pytest.raises(TypeError):
        tasks.extract_final(None)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="noise"):
        tasks.demonstrations(tasks.shop_problems(3, 0), noise=1.5, seed=0)
    with pytest.raises(ValueError, match="noise"):
        settings_for("quick", noise=-0.1)
    with pytest.raises(ValueError, match="objectives"):
        LabSettings(objectives=("sft", "nope"))
    with pytest.raises(ValueError, match="steps"):
        settings_for("default", steps=0)
    with pytest.raises(ValueError, match="preset"):
        settings_for("huge")


def test_cli_rejects_bad_settings_with_the_flag_name(capsys):
    from qtarget.cli import main

    assert main(["lab", "--tiny", "--noise", "1.5", "--output_dir", "unused"]) == 2
    assert "--noise" in capsys.readouterr().err
    assert main(["lab", "--quick", "--objectives", "sft,sftt", "--output_dir", "unused"]) == 2
    assert "--objectives" in capsys.readouterr().err
    assert main(["lab", "--quick", "--tiny"]) == 2  # mutually exclusive presets: one line naming both
    err = capsys.readouterr().err.strip()
    assert "--tiny" in err and "--quick" in err and len(err.splitlines()) == 1


def test_presets_give_every_objective_the_same_budget():
    for preset in ("default", "quick", "tiny"):
        s = settings_for(preset)
        assert s.objectives == ("sft", "dft", "psft", "asft", "target_sft", "dft_floor", "prift")
        assert s.tasks == ("glyph", "sum")   # every preset runs the weak- and the strong-prior task
        assert s.objective_args["psft"]["eps"] == 0.28 and s.objective_args["asft"]["lam"] == 0.05
        assert s.objective_args["target_sft"]["eta"] == 0.5
        assert s.steps % s.psft_updates_per_batch == 0  # PSFT ends on a full global batch
        assert s.steps * s.batch_size <= 2 * s.train_examples  # at most two passes over the demonstrations
        # learning curves in every preset but --quick, which measures the end only (its minutes)
        assert len(checkpoint_steps(s)) >= (1 if preset == "quick" else 2) and checkpoint_steps(s)[-1] == s.steps
    assert settings_for("quick").digest() != settings_for("default").digest()
    assert settings_for("quick", seed=1).digest() == settings_for("quick", seed=1).digest()


def test_shop_task_is_a_lab_task_whose_training_rows_avoid_every_evaluated_question():
    from qtarget.lab.builtin_tasks import build_task

    settings = settings_for("default", eval_in_domain=30, rank_items=40, ood_texts=5)
    task = build_task("shop", settings)
    assert task.name == "shop" and task.instruction == tasks.INSTRUCTION
    assert len(task.generation) == 30 and len(task.ranking) == 40 and len(task.ood) == 5
    assert task.n_candidates == settings.rank_distractors + 1
    evaluated = {p.question for p in task.generation} | {it["prompt"] for it in task.ranking}
    rows = task.demonstrations(0, 200, 0.3)
    assert len(rows) == 200 and not evaluated & {r["prompt"] for r in rows}
    assert sum(r["noise"] != "clean" for r in rows) == 60
    # generation answers are written as parse_answer writes a stated one; the ranking's correct candidate states it
    for p in task.generation:
        assert task.parse_answer(f"5 + 1 = 6. The answer is {p.answer}.") == p.answer
        assert task.is_correct(f"The answer is {p.answer}.", p) and not task.is_correct("no answer here", p)
    for it in task.ranking:
        assert [task.parse_answer(c) for c in it["candidates"]] == [str(a) for a in it["answers"]]
    assert task.parse_answer("3 + 4 = 7.") is None
    # the teacher's rows: clean, from their own stream
    assert {r["noise"] for r in task.demonstrations(7_000_000, 20, 0.0)} == {"clean"}
    with pytest.raises(ValueError, match="unknown lab task 'nope'"):
        build_task("nope", settings)


def test_lab_task_rejects_an_inconsistent_value():
    from qtarget.evaluation import Problem
    from qtarget.lab.task import LabTask

    good = dict(name="t", version="1", description="d", noise_description="n", instruction=None,
                demonstrations=lambda seed, n, noise: [], generation=(Problem("a", "q?", "1", "t"),),
                parse_answer=lambda r: r, ranking=({"id": "r", "prompt": "q", "candidates": ["a", "b"]},),
                ood=("some text",), example={"prompt": "q", "response": "a"})
    assert LabTask(**good).n_candidates == 2
    with pytest.raises(ValueError, match="generation is empty"):
        LabTask(**{**good, "generation": ()})
    with pytest.raises(ValueError, match="ranking item 0 .r. needs the correct candidate"):
        LabTask(**{**good, "ranking": ({"id": "r", "prompt": "q", "candidates": ["a"]},)})
    with pytest.raises(ValueError, match="same number of candidates"):
        LabTask(**{**good, "ranking": ({"id": "r", "prompt": "q", "candidates": ["a", "b"]},
                                       {"id": "s", "prompt": "q", "candidates": ["a", "b", "c"]})})


def _problem_of(items, problems):
    by_id = {p.id: p for p in problems}
    return [(it, by_id[it["id"]]) for it in items]


@pytest.mark.parametrize("name", GENERATORS)
def test_final_slip_distractors_are_wrong_only_in_the_last_step(name):
    """'final': every step but the last as in the correct solution, the last one's result off by a slip
    (±1, ±2, ±10), and the stated answer agrees with it: consistent text, wrong answer."""
    problems = GENERATORS[name][0](120, 8)
    items = tasks.ranking_items(problems, 2, 8, kind="final")
    for it, p in _problem_of(items, problems):
        correct = written_steps(it["candidates"][0])
        assert it["candidates"][0] == tasks.solution_text(p.steps, p.answer, style=p.style)
        for text, answer in zip(it["candidates"][1:], it["answers"][1:]):
            steps = written_steps(text)
            assert steps[:-1] == correct[:-1] and steps[-1][:3] == correct[-1][:3], text
            assert steps[-1][3] - correct[-1][3] in tasks.SLIPS and steps[-1][3] == answer != p.answer
            assert tasks.stated_answer(text) == answer >= 0
        assert len(set(it["answers"])) == 3 and it["kinds"] == ["final", "final"]


def test_near_slip_distractors_prefer_two_then_one_then_three():
    """'near': the last result off by 2 where both signs give a non-negative new answer (then one each), by 1
    or 3 only where 2 cannot (an answer of 0 or 1), every other step right; the answers of an item differ."""
    problems = tasks.sum_problems(200, 31)
    items = tasks.ranking_items(problems, 2, 5, kind="near")
    by_answer = {}
    for it, p in _problem_of(items, problems):
        correct = written_steps(it["candidates"][0])
        offsets = []
        for text, answer in zip(it["candidates"][1:], it["answers"][1:]):
            steps = written_steps(text)
            assert steps[:-1] == correct[:-1] and steps[-1][:3] == correct[-1][:3], text
            assert steps[-1][3] == answer and tasks.stated_answer(text) == answer >= 0 and answer != p.answer
            offsets.append(answer - p.answer)
        assert len(set(it["answers"])) == 3 and it["kinds"] == ["near", "near"]
        by_answer.setdefault(p.answer >= 2, []).append(sorted(offsets))
    assert by_answer[True] and all(o == [-2, 2] for o in by_answer[True])
    # an answer below 2: +2 and the nearest other slip that stays >= 0
    assert all(o[1] == 2 and o[0] in (-1, 1, 3) for o in by_answer.get(False, []))
    small = tasks.LabProblem(id="sum/x/0", task="sum", question="What is 5 - 5?", answer=0, events=[("sub", 5)], start=5)
    (it,) = tasks.ranking_items([small], 3, 0, kind="near")
    assert sorted(a - 0 for a in it["answers"][1:]) == [1, 2, 3]


def test_wrong_rule_distractors_are_consistent_arithmetic_under_another_rule():
    """'rule' (glyph): every equation right, the operator applied as 2*b + x or 3*x + b, so the answer is wrong
    although no arithmetic is; against a glyph problem only."""
    problems = tasks.glyph_problems(150, 9)
    items = tasks.ranking_items(problems, 2, 9, kind=("rule", "final"))
    rules_seen = set()
    for it, p in _problem_of(items, problems):
        assert it["kinds"][0] == "rule"
        numbers = [int(x) for x in p.question[len("What is "):-1].split(" ◇ ")]
        steps = written_steps(it["candidates"][1])
        assert all(evaluate_step(a, op, b) == c for a, op, b, c in steps), it["candidates"][1]
        # recompute under each wrong rule: one of them gives exactly these steps
        for rule, apply in (("swap", lambda x, b: (2, b, x)), ("triple", lambda x, b: (3, x, b))):
            total, expected = numbers[0], []
            for b in numbers[1:]:
                k, m, add = apply(total, b)
                expected += [(k, "*", m, k * m), (k * m, "+", add, k * m + add)]
                total = k * m + add
            if steps == expected:
                rules_seen.add(rule)
                assert total == it["answers"][1] != p.answer
                break
        else:
            raise AssertionError(f"no wrong rule gives {it['candidates'][1]} for {p.question}")
    assert rules_seen == {"swap", "triple"}
    with pytest.raises(ValueError, match="glyph problem"):
        tasks.ranking_items(tasks.sum_problems(3, 0), 1, 0, kind="rule")


def test_misread_distractors_keep_every_equation_right():
    problems = tasks.shop_problems(80, 4)
    for it, p in _problem_of(tasks.ranking_items(problems, 2, 4, kind=("final", "misread")), problems):
        assert it["kinds"] == ["final", "misread"]
        steps = written_steps(it["candidates"][2])
        assert all(evaluate_step(a, op, b) == c for a, op, b, c in steps) and it["answers"][2] != p.answer
    with pytest.raises(ValueError, match="distractor kind"):
        tasks.ranking_items(problems, 2, 4, kind="nope")


@pytest.mark.parametrize("name, kinds", [("glyph", ("rule", "final")), ("sum", ("near",)), ("shop", ("final", "misread"))])
def test_builtin_tasks_rank_against_their_distractors(name, kinds):
    from qtarget.lab.builtin_tasks import build_task

    task = build_task(name, settings_for("quick", rank_items=30, eval_in_domain=10, ood_texts=2))
    assert task.name == name and task.n_candidates == 3
    for it in task.ranking:
        assert it["kinds"] == [kinds[i % len(kinds)] for i in range(2)]
        assert [task.parse_answer(c) for c in it["candidates"]] == [str(a) for a in it["answers"]]
