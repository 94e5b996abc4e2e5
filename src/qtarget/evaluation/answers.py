"""Final-answer extraction and equivalence checking for reasoning benchmarks.

`check_answer(response, gold)` is the one public entry point:

1. The *final answer* is taken from the response: the last ``\\boxed{...}`` (nested braces allowed),
   else GSM8K's ``#### N``, else an "answer is X" / "Answer: X" phrase, else the last number.
2. The gold answer is read the same way (it may be a bare value, LaTeX such as ``\\frac{1}{2}``, a
   GSM8K solution ending in ``#### N``, or a CHAMP-style "A, or equivalently B" with alternatives).
3. A single letter A-E as gold means multiple choice: the chosen letter is extracted instead.
4. Equivalence: a normalised string match, then an exact numeric match, then symbolic equality through
   `math-verify` when it is installed (``backend="math_verify"``), else through a small LaTeX -> sympy
   translation (``backend="sympy"``). Both backends sit behind a timeout.
"""
from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Literal

import sympy
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

Backend = Literal["auto", "math_verify", "sympy"]

__all__ = [
    "check_answer", "extract_answer", "extract_boxed", "stated_answer", "answer_form", "ANSWER_FORMS", "extract_choice", "gold_candidates",
    "normalize_answer", "parse_number", "answers_equivalent", "math_verify_available",
]

# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]))?|(?<![\w.])-?\.\d+"
)
_ANSWER_PHRASE_RE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|=|:)\s*:?\s*(.+)", re.IGNORECASE
)


def _boxed_spans(text: str) -> Iterator[str]:
    """Yield the contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in order (brace-matched)."""
    for m in _BOX_RE.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{" and (j == 0 or text[j - 1] != "\\"):
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        yield text[i + 1 : j]
                        break
                j += 1
            # an unclosed brace (answer cut at the token limit) yields nothing
        else:  # "\boxed 5" form
            tail = re.match(r"[^\s$.,;]+", text[i:])
            if tail:
                yield tail.group(0)


def extract_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` in `text`; nested boxes are unwrapped to the innermost."""
    spans = [s for s in _boxed_spans(text) if s.strip()]  # an empty \boxed{} is not an answer
    if not spans:
        return None
    inner = spans[-1].strip()
    while True:  # \boxed{\boxed{5}} -> 5
        nested = list(_boxed_spans(inner))
        if len(nested) == 1 and _BOX_RE.match(inner) and inner.rstrip().endswith("}"):
            inner = nested[0].strip()
        else:
            return inner


def _last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(" ", "") if found else None


def _strip_sentence(s: str) -> str:
    s = s.strip().splitlines()[0] if s.strip() else ""
    # cut at a sentence end ('. ' or final '.') but keep decimal points
    s = re.split(r"(?<!\d)\.(?:\s|$)|\.\s", s)[0]
    return s.strip().strip("*").strip()


def extract_answer(response: str) -> str | None:
    """The final answer in a model response, as a string, or None.

    Order: last ``\\boxed{}`` -> ``#### X`` -> "answer is X" / "Answer: X" -> last number.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    for form in ANSWER_FORMS:
        found = stated_answer(response, form)
        if found is not None:
            return found
    return _last_number(response)


# The forms in which a response can state its final answer, in the order `extract_answer` reads them.
ANSWER_FORMS = ("boxed", "hashes", "answer_is")
FORM_TEXT = {"boxed": "\\boxed{X}", "hashes": "'#### X'", "answer_is": "'The answer is X'"}


def _hashes_answer(response: str) -> str | None:
    hashes = re.findall(r"####\s*(.+)", response)
    return _strip_sentence(hashes[-1]) or None if hashes else None


def _phrase_answer(response: str) -> str | None:
    """The last "answer is X" / "Answer: X" whose X looks like a value (a digit, or at most three words)."""
    phrases = [p for p in map(_strip_sentence, _ANSWER_PHRASE_RE.findall(response))
               if p and (re.search(r"\d", p) or len(p.split()) <= 3) and "boxed" not in p]
    if not phrases:
        return None
    dollars = re.fullmatch(r"\$([^$]+)\$", phrases[-1])
    return dollars.group(1).strip() if dollars else phrases[-1]  # "the answer is $\frac{1}{2}$"


def stated_answer(response: str, form: str) -> str | None:
    """The final answer `response` states in `form` (one of ANSWER_FORMS), or None when it states none
    in that form; never the last-number fallback."""
    if form == "boxed":
        return extract_boxed(response)
    if form == "hashes":
        return _hashes_answer(response)
    if form == "answer_is":
        return _phrase_answer(response)
    raise ValueError(f"unknown answer form {form!r}; one of {', '.join(ANSWER_FORMS)}")


def answer_form(response: str) -> str | None:
    """The form in which `response` states its final answer (the first of ANSWER_FORMS it uses), or None."""
    return next((f for f in ANSWER_FORMS if stated_answer(response, f) is not None), None)


_CHOICE_RE = r"\(?\s*([A-E])\s*\)?"


def extract_choice(response: str, letters: str = "ABCDE") -> str | None:
    """The multiple-choice letter a response settles on ("(B)", "answer: B", "\\boxed{B}"), or None."""
    boxed = extract_boxed(response)
    if boxed is not None:
        inner = re.sub(r"\\text\{([^{}]*)\}|\\textbf\{([^{}]*)\}", r"\1\2", boxed).strip()
        m = re.fullmatch(_CHOICE_RE + r"(?:[.:)]\s*.*)?", inner)
        if m and m.group(1) in letters:
            return m.group(1)
    phrase = re.findall(
        r"(?:answer|choice|option)\s*(?:is|:)?\s*:?\s*\**\s*\(?([A-E])\)?(?![A-Za-z])", response,
        re.IGNORECASE,
    )
    phrase = [p.upper() for p in phrase if p.upper() in letters and p.isupper()]
    if phrase:
        return phrase[-1]
    paren = [p for p in re.findall(r"\(([A-E])\)", response) if p in letters]
    if paren:
        return paren[-1]
    bare = re.fullmatch(r"\s*" + _CHOICE_RE + r"[.)]?\s*", response)
    if bare and bare.group(1) in letters:
        return bare.group(1)
    return None


# ---------------------------------------------------------------------------------------------
# gold answers
# ---------------------------------------------------------------------------------------------

_ALTERNATIVE_SPLIT = re.compile(
    r",?\s+or (?:equivalently|approximately|an equivalent form such as)\s+", re.IGNORECASE
)


def gold_candidates(gold: str) -> list[str]:
    """Acceptable forms of a gold answer.

    Handles a GSM8K solution (``... #### 18``), a boxed solution, CHAMP's "A, or equivalently B"
    alternatives, and a trailing explanation in parentheses ("100 (i.e., all values)").
    """
    if not isinstance(gold, str):
        gold = str(gold)
    gold = gold.strip()
    if not gold:
        raise ValueError("gold answer is empty")
    if "####" in gold:
        return [_strip_sentence(gold.rsplit("####", 1)[1])]
    boxed = extract_boxed(gold)
    if boxed is not None:
        return [boxed]
    out: list[str] = []
    for part in _ALTERNATIVE_SPLIT.split(gold):
        part = part.strip()
        if not part:
            continue
        out.append(part)
        short = re.sub(r"\s*\((?:i\.e\.|e\.g\.)[^()]*\)\s*$", "", part).strip()
        if short and short != part:
            out.append(short)
        only = re.fullmatch(r"(.+?) is the only possible value", short)
        if only:
            out.append(only.group(1))
    return out


def _is_choice_gold(gold: str) -> str | None:
    m = re.fullmatch(r"\s*\(?([A-E])\)?\.?\s*", gold)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------

_UNIT_WORDS = (
    r"dollars?|cents?|euros?|pounds?|percent|degrees?|units?|sq(?:uare)?\s*\w+|cm|mm|km|m|kg|g|mg|"
    r"lbs?|oz|ft|feet|foot|inch(?:es)?|in|yards?|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|"
    r"secs?|days?|weeks?|months?|years?|people|students|apples|points|meters?|liters?|litres?|ml|"
    r"gallons?|cups?|pages?|books?|times|ways|[a-z]+s"
)


def normalize_answer(ans: str) -> str:
    """A canonical string for an answer: LaTeX wrappers, units, currency, thousands separators removed.

    ``"\\$1,000.00"`` -> ``"1000"``, ``"\\dfrac12"`` -> ``"\\frac{1}{2}"``, ``"5 \\text{ cm}"`` -> ``"5"``.
    """
    s = ans.strip()
    s = s.strip("$").strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = re.sub(r"\\(?:left|right|displaystyle|,|;|!|quad|qquad)", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "%").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = s.strip().rstrip(".").strip()
    # "18 dollars", "5 cm", "12 hours", "10%": a number followed by a unit word
    m = re.fullmatch(r"(-?[\d.,]+(?:\s*/\s*\d+)?)\s*(?:%|(?:" + _UNIT_WORDS + r")\b.*)", s, re.IGNORECASE)
    if m:
        s = m.group(1)
    s = re.sub(r"^(?:[a-zA-Z]\w*\s*=\s*)(?=[-\d.])", "", s)  # "x = 5" -> "5"
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".") or "0"
    s = re.sub(r"\s+", " ", s).strip()
    return s.lower() if re.fullmatch(r"[A-Za-z ]+", s) else s


def parse_number(s: str) -> Fraction | None:
    """An exact rational for a normalised numeric string ("1/2", "-0.25", "\\frac{3}{4}"), else None."""
    s = s.replace(" ", "")
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    try:
        if m:
            val = Fraction(m.group(2)) / Fraction(m.group(3))
            return -val if m.group(1) else val
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", s)
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)(?:e-?\d+)?", s):
            return Fraction(s)
    except (ZeroDivisionError, ValueError):
        return None
    return None


# ---------------------------------------------------------------------------------------------
# symbolic backends
# ---------------------------------------------------------------------------------------------


def math_verify_available() -> bool:
    try:
        import math_verify  # noqa: F401, PLC0415 - optional (eval extra)
    except ImportError:
        return False
    return True


class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM-based limit in the main thread; no limit elsewhere (signals only work there)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _math_verify_equal(pred: str, gold: str, timeout: float) -> bool:
    import math_verify.grader  # noqa: PLC0415 - optional (eval extra)
    import math_verify.parser  # noqa: PLC0415
    from math_verify import parse, verify  # noqa: PLC0415

    # we apply our own limit (below); silence math-verify's "timeout disabled" notice about that
    math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    # math-verify's own timeouts use SIGALRM too; nest ours outside and switch its own off.
    with _time_limit(timeout):
        g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=None))


_LATEX_SUBS: list[tuple[str, str]] = [
    (r"\\cdot|\\times", "*"), (r"\\div", "/"), (r"\\pi", "pi"), (r"\\infty", "oo"),
    (r"\\ln", "log"), (r"\\log", "log"), (r"\\sin", "sin"), (r"\\cos", "cos"), (r"\\tan", "tan"),
    (r"\\exp", "exp"), (r"\^", "**"),
]


def _brace_group(s: str, i: int) -> tuple[str, int]:
    """The `{...}` group starting at s[i] (or the single character there) and the index after it."""
    if i < len(s) and s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[i + 1 : j], j + 1
        raise ValueError(f"unbalanced braces in {s!r}")
    if i >= len(s):
        raise ValueError(f"missing argument in {s!r}")
    return s[i], i + 1


def _expand_latex(s: str) -> str:
    """Rewrite \\frac{a}{b} -> ((a)/(b)) and \\sqrt[n]{a} -> ((a)**(1/(n))), recursively."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            j = i + 5
            while j < len(s) and s[j] == " ":
                j += 1
            num, j = _brace_group(s, j)
            den, j = _brace_group(s, j)
            out.append(f"(({_expand_latex(num)})/({_expand_latex(den)}))")
            i = j
        elif s.startswith("\\sqrt", i):
            j, root = i + 5, "2"
            if j < len(s) and s[j] == "[":
                k = s.index("]", j)
                root, j = s[j + 1 : k], k + 1
            arg, j = _brace_group(s, j)
            out.append(f"(({_expand_latex(arg)})**(1/({root})))")
            i = j
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _latex_to_sympy(s: str):
    """Translate a small LaTeX subset (fractions, roots, powers, products, pi) to a sympy expression."""
    s = normalize_answer(s).replace("%", "/100")
    s = _expand_latex(s)
    for pat, rep in _LATEX_SUBS:
        s = re.sub(pat, rep, s)
    s = s.replace("{", "(").replace("}", ")").replace("\\", "")
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    return sympy.sympify(parse_expr(s, transformations=transformations, evaluate=True))


def _sympy_equal(pred: str, gold: str, timeout: float) -> bool:
    with _time_limit(timeout):
        try:
            a, b = _latex_to_sympy(pred), _latex_to_sympy(gold)
        except Exception:
            return False
        try:
            if sympy.simplify(a - b) == 0:
                return True
            diff = complex(sympy.N(a - b))
            scale = max(1.0, abs(complex(sympy.N(b))))
            return abs(diff) <= 1e-6 * scale
        except Exception:
            return False


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def answers_equivalent(pred: str, gold: str, *, backend: Backend = "auto", timeout: float = 5.0) -> bool:
    """Whether two extracted answers are the same value (normalised string, exact number, symbolic)."""
    np_, ng = normalize_answer(pred), normalize_answer(gold)
    if not np_ or not ng:
        return False
    if np_ == ng:
        return True
    a, b = parse_number(np_), parse_number(ng)
    if a is not None and b is not None:
        return a == b
    if re.fullmatch(r"[a-z ]+", np_) and re.fullmatch(r"[a-z ]+", ng):
        return False  # two different words ("yes" / "no"): no symbolic step
    symbolic: Callable[[str, str, float], bool]
    if backend == "auto":
        symbolic = _math_verify_equal if math_verify_available() else _sympy_equal
    elif backend == "math_verify":
        symbolic = _math_verify_equal
    elif backend == "sympy":
        symbolic = _sympy_equal
    else:
        raise ValueError(f"backend must be 'auto', 'math_verify' or 'sympy', got {backend!r}")
    try:
        return symbolic(pred, gold, timeout)
    except _Timeout:
        return False
    except Exception:
        return False


def check_answer(response: str, gold: str, *, backend: Backend = "auto", timeout: float = 5.0) -> bool:
    """Whether the final answer in `response` equals `gold`.

    `gold` may be a value ("0.5", "\\frac{1}{2}", "$1,000"), a GSM8K solution ending in "#### N",
    CHAMP-style alternatives ("C(10, 5), or equivalently 252"), or a multiple-choice letter A-E (then
    the response's chosen letter is compared). `backend` picks the symbolic step: "math_verify"
    (the math-verify package), "sympy" (built-in fallback), or "auto" (math-verify when installed).
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(gold, str):
        gold = str(gold)
    letter = _is_choice_gold(gold)
    if letter is not None:
        return extract_choice(response) == letter
    pred = extract_answer(response)
    if pred is None:
        return False
    return any(answers_equivalent(pred, g, backend=backend, timeout=timeout) for g in gold_candidates(gold))
