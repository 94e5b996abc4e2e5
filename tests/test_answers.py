"""Answer extraction and equivalence: a table of tricky pairs, run through both symbolic backends."""
from __future__ import annotations

import pytest

import qtarget
from qtarget.evaluation import answers
from qtarget.evaluation.answers import (
    check_answer, extract_answer, extract_boxed, extract_choice, gold_candidates, normalize_answer,
)

# (response, gold, expected verdict)
TRICKY = [
    # the same half, five spellings
    (r"So the answer is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{\dfrac12}", "1/2", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{1/2}", r"\dfrac{1}{2}", True),
    (r"\boxed{0.50}", r"\tfrac{1}{2}", True),
    (r"\boxed{\frac{1}{3}}", "0.5", False),
    # thousands separators
    ("The total is 1,000 dollars.\n#### 1,000", "1000", True),
    (r"\boxed{1000}", "1,000", True),
    (r"\boxed{1,000}", "100", False),
    # units and currency
    (r"He pays \boxed{\$18}", "18", True),
    (r"\boxed{18 \text{ dollars}}", "$18", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{10\%}", "10", True),
    ("Answer: 12 apples", "12", True),
    # negatives
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{-3}", "3", False),
    (r"The final answer is -0.25", r"-\frac{1}{4}", True),
    # nested boxes and text around the answer
    (r"\boxed{\boxed{42}}", "42", True),
    (r"First \boxed{7}, but wait, correcting: \boxed{\frac{8}{2}} done.", "4", True),
    (r"First \boxed{7}, but wait, correcting: \boxed{\frac{8}{2}} done.", "7", False),
    ("The answer is 7.", "7", True),
    ("we get 3 then 4, finally 5 left", "5", True),
    ("I think it's 6", "5", False),
    ("the answer is $\\frac{3}{4}$.", "0.75", True),
    (r"\boxed{3.50}", "3.5", True),
    # symbolic
    (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{2^{n-1}}", "2^(n-1)", True),
    (r"\boxed{\sqrt{2}}", "sqrt(2)", True),
    (r"\boxed{\sqrt{2}}", "sqrt(3)", False),
    # gold formats: GSM8K solution, CHAMP alternatives and explanations
    ("#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", True),
    (r"\boxed{252}", "C(10, 5), or equivalently 252", True),
    (r"\boxed{No}", "No", True),
    (r"\boxed{Yes}", "No", False),
    (r"\boxed{100}", "100 (i.e., all values)", True),
    (r"\boxed{0}", "0 is the only possible value", True),
    # multiple choice
    ("The answer is (B).", "B", True),
    (r"\boxed{C}", "B", False),
    ("Answer: D", "D", True),
    (r"so \boxed{\text{(A)}}", "A", True),
    ("Options (A) and (C) are wrong, so the answer is B", "B", True),
    # an empty box and an "answer is within \boxed{}" sentence are skipped (seen from SmolLM2)
    ("This gives $0.\n\nSo, the final answer is 0.\n\nThe answer is within \\boxed{}.", "0", True),
    (r"\boxed{} hmm, 12 in total", "12", True),
    # nothing to extract / cut mid-box
    (r"The answer is \boxed{", "5", False),
    ("no digits here", "5", False),
]


@pytest.mark.parametrize("backend", ["math_verify", "sympy"])
@pytest.mark.parametrize(("response", "gold", "expected"), TRICKY)
def test_tricky_pairs(response, gold, expected, backend):
    assert check_answer(response, gold, backend=backend) is expected


def test_top_level_reexport():
    assert qtarget.check_answer is check_answer
    assert qtarget.check_answer(r"\boxed{\frac{1}{2}}", "0.5")


def test_auto_backend_falls_back_without_math_verify(monkeypatch):
    monkeypatch.setattr(answers, "math_verify_available", lambda: False)
    called = []
    real = answers._sympy_equal
    monkeypatch.setattr(answers, "_sympy_equal", lambda *a: called.append(a) or real(*a))
    assert check_answer(r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}")
    assert called, "the sympy fallback was not used"


def test_extract_boxed_nested_braces():
    assert extract_boxed(r"x \boxed{\frac{a^{2}}{\sqrt{b}}} y") == r"\frac{a^{2}}{\sqrt{b}}"
    assert extract_boxed(r"\boxed{1} and \fbox{2}") == "2"
    assert extract_boxed("no box") is None
    assert extract_boxed(r"\boxed{unclosed") is None


def test_extract_answer_order():
    # boxed beats #### beats phrase beats last number
    assert extract_answer(r"#### 3 then \boxed{4} 5") == "4"
    assert extract_answer("answer is 2\n#### 3\n7") == "3"
    assert extract_answer("The answer is 12. Then 99 more words 100") == "12"
    assert extract_answer("1, 2 and 1,234.5 finally") == "1,234.5"
    assert extract_answer("nothing") is None


def test_extract_choice():
    assert extract_choice(r"\boxed{(C)}") == "C"
    assert extract_choice("The correct option is (E)") == "E"
    assert extract_choice("A cat sat.") is None  # the article 'A' is not a choice
    assert extract_choice(" B. ") == "B"


def test_gold_candidates():
    assert gold_candidates("sqrt(3)/3, or equivalently 1/sqrt(3)") == ["sqrt(3)/3", "1/sqrt(3)"]
    assert "100" in gold_candidates("100 (i.e., all values)")
    with pytest.raises(ValueError, match="gold answer is empty"):
        gold_candidates("  ")


def test_normalize():
    assert normalize_answer(r"\$1,000.00") == "1000"
    assert normalize_answer(r"\dfrac12") == r"\frac{1}{2}"
    assert normalize_answer("x = 5") == "5"


def test_bad_input_types():
    with pytest.raises(TypeError, match="response must be a str"):
        check_answer(None, "1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be"):
        check_answer(r"\boxed{x+1}", "1+x", backend="nope")  # type: ignore[arg-type]
