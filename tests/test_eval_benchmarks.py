"""Offline benchmark loaders, user files, and the hub error when offline."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from qtarget.evaluation.answers import check_answer, gold_candidates
from qtarget.evaluation.benchmarks import (
    arithmetic_problems, jsonl_file, list_benchmarks, load_benchmark, load_benchmarks,
)


def test_gsm8k_100_answers_match_their_reference_solutions():
    probs = load_benchmark("gsm8k_100")
    assert len(probs) == 100 and len({p.id for p in probs}) == 100
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in probs)
    # every reference solution (ending in "#### N") grades as correct against its own answer
    assert all(check_answer(p.meta["solution"], p.answer) for p in probs)
    assert not check_answer(probs[0].meta["solution"], str(int(float(probs[0].answer)) + 1))


def test_champ_has_270_problems_in_five_categories():
    probs = load_benchmark("champ")
    assert len(probs) == 270
    assert Counter(p.meta["category"] for p in probs) == {
        "Number-Theory": 80, "Inequality": 50, "Polynomial": 50, "Sequence": 50, "Combinatorics": 40}
    by_id = {p.id: p for p in probs}
    assert by_id["champ/P_Combinatorics_1"].answer == "239"
    assert check_answer(r"\boxed{252}", by_id["champ/P_Combinatorics_2"].answer)
    # every gold answer (numbers, expressions, words, prose) is reachable by a boxed response
    for p in probs:
        assert check_answer("\\boxed{" + gold_candidates(p.answer)[-1] + "}", p.answer), p.id


def _solve_arith(question: str) -> int:
    """Independent interpreter of the generated sentences."""
    x = None
    for sent in re.split(r"(?<=[.?])\s+", question):
        if m := re.fullmatch(r"\w+ has (\d+) \w+\.", sent):
            x = int(m.group(1))
        elif m := re.fullmatch(r"Then \w+ finds (\d+) more \w+\.", sent):
            x += int(m.group(1))
        elif m := re.fullmatch(r"\w+ gives (\d+) \w+ to a friend\.", sent):
            x -= int(m.group(1))
        elif m := re.fullmatch(r"\w+ buys (\d+) packs with (\d+) \w+ in each pack\.", sent):
            x += int(m.group(1)) * int(m.group(2))
        elif re.fullmatch(r"Then the number of \w+ \w+ has doubles\.", sent):
            x *= 2
        elif m := re.fullmatch(r"\w+ splits the \w+ into (\d+) equal groups and keeps one group\.", sent):
            assert x % int(m.group(1)) == 0
            x //= int(m.group(1))
        elif sent.startswith("How many"):
            continue
        else:
            raise AssertionError(f"unparsed sentence {sent!r}")
        assert x >= 0
    return x


def test_arith_is_seeded_and_exact():
    a = arithmetic_problems(50, seed=3)
    assert a == arithmetic_problems(50, seed=3)
    assert [p.question for p in a] != [p.question for p in arithmetic_problems(50, seed=4)]
    for p in a:
        assert int(p.answer) == _solve_arith(p.question)
    assert len(load_benchmark("arith")) == 100
    assert len(load_benchmark("arith:7")) == 7


def test_jsonl_file_and_errors(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"question": "1+1?", "answer": 2}) + "\n\n"
                    + json.dumps({"problem": "2+2?", "answer": "4", "id": "x", "level": 1}) + "\n")
    probs = load_benchmark(str(good))
    assert [(p.id, p.question, p.answer) for p in probs] == [("mine/1", "1+1?", "2"), ("mine/x", "2+2?", "4")]
    assert probs[1].meta == {"level": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer'"):
        jsonl_file(bad)
    bad.write_text('{"question": "q", "answer": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        jsonl_file(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark(str(tmp_path / "missing.jsonl"))


def test_unknown_name_and_limit():
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'.*gsm8k_100"):
        load_benchmark("gsm9k")
    assert len(load_benchmarks("gsm8k_100,arith", limit=3)) == 6
    with pytest.raises(ValueError, match="benchmark\\(s\\) 'arith' listed more than once"):
        load_benchmarks("arith,arith")
    assert set(list_benchmarks()) >= {"gsm8k_100", "champ", "arith", "math500", "aime24", "amc23",
                                      "minerva_math", "olympiadbench", "gpqa_diamond"}


def test_hub_benchmark_offline_gives_clear_error():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = ("from qtarget.evaluation.benchmarks import load_benchmark, HubUnavailableError\n"
            "try:\n    load_benchmark('math500')\nexcept HubUnavailableError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR benchmark 'math500' needs the Hugging Face hub dataset 'HuggingFaceH4/MATH-500'" in out.stdout
    assert "unreachable" in out.stdout and "gsm8k_100, champ, arith" in out.stdout
