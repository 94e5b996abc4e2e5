"""The lab's procedural tasks: every problem is generated from a seed and has a checkable answer.

In-domain ("shop"): multi-step arithmetic word problems with a compact chain of thought, one equation
per step, ending in "The answer is N." The training demonstrations come from here, optionally noisy:

- `corrupt`: one step's result is wrong (off by a small amount) and the error is carried to the end,
  so the demonstrated final answer is wrong (a noisy label);
- `alternative`: a correct solution in a different surface form (operands swapped, words instead of
  symbols, a different closing phrase): non-unique tokens for the same reasoning.

Out-of-domain ("convert"): unit conversions ("How many minutes are in 7 hours?"), a task type the
demonstrations never show. Its accuracy before and after fine-tuning measures forgetting.

Strong prior ("sum"): one-step sums and differences in the same notation. Weak prior ("glyph"): an
invented operator (x ◇ b = 2 * x + b) solved in a compact notation, learned from the demonstrations alone.

Every generator is a pure function of its seed (`random.Random(seed)`), so a run is reproducible.
`qtarget.lab.builtin_tasks` packs each into a `qtarget.lab.task.LabTask`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Collection

# The instruction is the chat's system turn (it replaces SmolLM2's default system prompt, which would
# cost ~20 more tokens per example); the user turn is the question alone. Same in training and eval.
INSTRUCTION = "Solve step by step. End with: The answer is N."
TASK_VERSION = 4  # part of the teacher cache key: bump when a generator changes
EVAL_SEED = 9_000_000  # evaluation streams: generation 9_000_000 + seed, ranking 9_000_001 + seed
SUM_EVAL_SEED = 9_500_000  # the sum task's evaluation streams
GLYPH_EVAL_SEED = 9_700_000  # the glyph task's evaluation streams
NOISE_KINDS = ("corrupt", "alternative")

_NAMES = ("Mia", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Sara", "Ben", "Nina", "Tom",
          "Lena", "Ivan", "Maya", "Raj", "Ella", "Sam", "Yuki", "Ana")
_ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells", "cards",
          "coins", "eggs", "flowers", "toy cars", "beads", "oranges")
_CONTAINERS = ("bags", "boxes", "packs", "jars", "baskets")


@dataclass(frozen=True)
class Step:
    """One written step `left op right = result` (op in + - *). `result` is what the step *states*;
    it differs from the true value only in a corrupted demonstration."""

    op: str
    left: int
    right: int
    result: int

    @property
    def true_result(self) -> int:
        return apply_op(self.op, self.left, self.right)


@dataclass
class LabProblem:
    """A generated problem. `answer` is the correct final answer; `steps` the correct solution."""

    id: str
    task: str
    question: str
    answer: int
    events: list[tuple] = field(default_factory=list)
    start: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    style: str = "symbols"   # the notation of its written solution (`solution_text`)

    @property
    def steps(self) -> list[Step]:
        """The correct written solution."""
        return solve(self.start, self.events)[0]

    @property
    def prompt(self) -> str:
        """The user turn (the question; the instruction is the system turn), as in evaluation."""
        return self.question


def apply_op(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}; expected one of + - *")


# ---------------------------------------------------------------------------------------------
# in-domain: shop arithmetic
# ---------------------------------------------------------------------------------------------

def solve(start: int, events: list[tuple], *, corrupt_at: int | None = None, delta: int = 0
          ) -> tuple[list[Step], int]:
    """The written steps for `events` applied to `start`, and the final value they reach.

    Events: ("add", k), ("sub", k), ("packs", a, b) (two steps: a * b, then total + product), ("glyph", b) (two
    steps: 2 * total, then that + b). With
    `corrupt_at`, the step of that index states its result off by `delta` and every later step
    computes from the wrong value (the error is carried to the final answer)."""
    steps: list[Step] = []
    total = start

    def write(op: str, a: int, b: int) -> int:
        value = apply_op(op, a, b)
        if corrupt_at is not None and len(steps) == corrupt_at:
            value += delta
        steps.append(Step(op, a, b, value))
        return value

    for ev in events:
        if ev[0] == "add":
            total = write("+", total, ev[1])
        elif ev[0] == "sub":
            total = write("-", total, ev[1])
        elif ev[0] == "packs":
            product = write("*", ev[1], ev[2])
            total = write("+", total, product)
        elif ev[0] == "glyph":   # total ◇ b = 2 * total + b (the glyph task's invented operator)
            double = write("*", 2, total)
            total = write("+", double, ev[1])
        else:
            raise ValueError(f"unknown event {ev!r}")
    return steps, total


def _shop_problem(rng: random.Random, index: int, seed: int, n_events: tuple[int, int]) -> LabProblem:
    # Small numbers (single-digit operands, totals mostly below 40): a 135M model trained for a few
    # dozen steps must be able to get some of these right, or accuracy cannot separate objectives.
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start = rng.randint(3, 20)
    x = start
    sentences = [f"{name} has {start} {item}."]
    events: list[tuple] = []
    for _ in range(rng.randint(*n_events)):
        kind = rng.choice(("buy", "give", "packs", "find"))
        if kind == "give" and x < 3:
            kind = "find"
        if kind in ("buy", "find"):
            k = rng.randint(2, 9)
            sentences.append(f"{'Then ' if events else ''}{name} {'buys' if kind == 'buy' else 'finds'} {k} more.")
            events.append(("add", k))
            x += k
        elif kind == "give":
            k = rng.randint(1, min(9, x - 1))
            sentences.append(f"{'Then ' if events else ''}{name} gives away {k}.")
            events.append(("sub", k))
            x -= k
        else:
            a, b = rng.randint(2, 3), rng.randint(2, 5)
            sentences.append(f"{'Then ' if events else ''}{name} gets {a} {rng.choice(_CONTAINERS)} with {b} "
                             f"{item} in each.")
            events.append(("packs", a, b))
            x += a * b
    sentences.append(f"How many {item} does {name} have now?")
    return LabProblem(id=f"shop/{seed}/{index}", task="shop", question=" ".join(sentences), answer=x,
                      events=events, start=start)


def shop_problems(n: int, seed: int, *, n_events: tuple[int, int] = (1, 2)) -> list[LabProblem]:
    """`n` in-domain problems from `seed` (1-2 events; a 'packs' event is two steps)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"shop:{seed}")
    return [_shop_problem(rng, i, seed, n_events) for i in range(n)]


STYLES = ("symbols", "words", "compact")


def solution_text(steps: list[Step], answer: int, *, style: str = "symbols", swap: bool = False,
                  closing: str = "The answer is {}.") -> str:
    """The chain of thought for `steps`, then the closing sentence.

    style "symbols" writes `3 * 5 = 15.` per step; "words" writes `3 times 5 is 15.`; "compact" writes the
    steps without spaces, joined by ';' (`2*7=14;14+3=17.`, the glyph task's notation); `swap` writes
    commutative operands (+, *) in the other order. The results shown are the steps' own `result` values."""
    words = {"+": "plus", "-": "minus", "*": "times"}
    if style not in STYLES:
        raise ValueError(f"unknown solution style {style!r}; expected one of {STYLES}")
    parts = []
    for s in steps:
        a, b = (s.right, s.left) if swap and s.op in "+*" else (s.left, s.right)
        if style == "symbols":
            parts.append(f"{a} {s.op} {b} = {s.result}.")
        elif style == "words":
            parts.append(f"{a} {words[s.op]} {b} is {s.result}.")
        else:
            parts.append(f"{a}{s.op}{b}={s.result}")
    chain = ";".join(parts) + "." if style == "compact" else " ".join(parts)
    return f"{chain} {closing.format(answer)}"


def corrupt_solution(problem: LabProblem, rng: random.Random, taken: Collection[int] = ()
                     ) -> tuple[list[Step], int]:
    """A wrong demonstration: one step states a result off by a small nonzero amount and the later
    steps compute from it. Returns (steps, the wrong final answer)."""
    n_steps = len(problem.steps)
    at = rng.randrange(n_steps)
    delta = rng.choice((-3, -2, -1, 1, 2, 3, 10))
    steps, final = solve(problem.start, problem.events, corrupt_at=at, delta=delta)
    return steps, final


def demonstration(problem: LabProblem, kind: str | None, rng: random.Random) -> tuple[str, int]:
    """The demonstrated response for `problem`: clean (kind None), 'corrupt' or 'alternative'.
    Returns (response text, the final answer it states)."""
    style = problem.style
    if kind is None:
        return solution_text(problem.steps, problem.answer, style=style), problem.answer
    if kind == "corrupt":
        steps, wrong = corrupt_solution(problem, rng)
        return solution_text(steps, wrong, style=style), wrong
    if kind == "alternative":
        variant = rng.choice(("swap", "words", "closing"))
        if variant == "swap" and not any(s.op in "+*" for s in problem.steps):
            variant = "words"
        if variant == "swap":
            text = solution_text(problem.steps, problem.answer, style=style, swap=True)
            if text != solution_text(problem.steps, problem.answer, style=style):  # "5 + 5" swaps to itself
                return text, problem.answer
            variant = "words"
        if variant == "words":
            return solution_text(problem.steps, problem.answer, style="words"), problem.answer
        return solution_text(problem.steps, problem.answer, style=style, closing="So the answer is {}."), problem.answer
    raise ValueError(f"unknown noise kind {kind!r}; expected None or one of {NOISE_KINDS}")


def demonstrations(problems: list[LabProblem], noise: float, seed: int) -> list[dict[str, Any]]:
    """Training rows {prompt, response, noise, stated_answer, answer, id, clean_response} for `problems`
    (`clean_response` is the correct demonstration, so the noisy tokens can be located). A clean row also
    has `counterfactual_response`, a corruption it did *not* get (never trained on): it marks the tokens of
    the clean demonstration that a corruption would have changed, the matched control for noise fit.

    Exactly round(noise * n) rows are noisy (chosen with `seed`), alternating corrupt / alternative
    in a seeded order, so the noisy share is what was asked for."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1] (the share of noisy demonstrations), got {noise}")
    rng = random.Random(f"noise:{seed}")
    n = len(problems)
    n_noisy = int(round(noise * n))
    noisy = set(rng.sample(range(n), n_noisy))
    kinds = [NOISE_KINDS[i % 2] for i in range(n_noisy)]
    rng.shuffle(kinds)
    kind_of = dict(zip(sorted(noisy), kinds))
    counterfactual_rng = random.Random(f"counterfactual:{seed}")  # apart, so the training data do not change
    rows = []
    for i, p in enumerate(problems):
        kind = kind_of.get(i)
        response, stated = demonstration(p, kind, rng)
        row = {"prompt": p.prompt, "response": response, "noise": kind or "clean", "stated_answer": stated,
               "answer": p.answer, "id": p.id, "clean_response": solution_text(p.steps, p.answer, style=p.style)}
        if kind is None:
            row["counterfactual_response"] = solution_text(*corrupt_solution(p, counterfactual_rng), style=p.style)
        rows.append(row)
    return rows


def misread_solution(problem: LabProblem, rng: random.Random, taken: Collection[int] = ()
                     ) -> tuple[list[Step], int]:
    """A wrong solution that is right about everything but one number it read from the question: one operand
    (the start or an event's amount) is off by 1-3 and every step is computed correctly from it, so no
    equation is false and the final answer is wrong but consistent with the text. Returns (steps, answer)."""
    slots = [(-1, 0)] + [(i, j) for i, ev in enumerate(problem.events) for j in range(1, len(ev))]
    for _ in range(100):
        i, j = rng.choice(slots)
        delta = rng.choice((-3, -2, -1, 1, 2, 3))
        start, events = problem.start, [list(ev) for ev in problem.events]
        if i < 0:
            start += delta
            new = start
        else:
            events[i][j] += delta
            new = events[i][j]
        if new < 1:
            continue
        steps, final = solve(start, [tuple(ev) for ev in events])
        if final != problem.answer and all(s.result >= 0 for s in steps):
            return steps, final
    raise RuntimeError(f"could not misread {problem.id}")


SLIPS = (-10, -2, -1, 1, 2, 10)   # a final slip: a units digit off by one or two, or a carry / borrow lost or added


def final_slip_solution(problem: LabProblem, rng: random.Random, taken: Collection[int] = ()
                        ) -> tuple[list[Step], int]:
    """A wrong solution whose only error is the last step's result, off by a plausible slip (SLIPS: ±1, ±2 in
    the units digit, ±10 for a lost or extra carry), stated again as the final answer: every other step is
    right and the closing agrees with the text, so only checking the last equation rejects it."""
    last = len(problem.steps) - 1
    for _ in range(100):
        steps, final = solve(problem.start, problem.events, corrupt_at=last, delta=rng.choice(SLIPS))
        if final >= 0 and final != problem.answer:
            return steps, final
    raise RuntimeError(f"could not slip the last step of {problem.id}")


# the near slips in order of preference: the units digit off by two, then by one, then by three. On one-step
# sums the base model rejects a slip of ±2 least often (SmolLM2-135M-Instruct on 150 problems of a design-only
# stream: -2 0.75, +2 0.84, -1 0.88, +1 0.94, ±3 0.89-0.95, ±10 0.98; both ±2 together 0.67)
NEAR_SLIPS = ((-2, 2), (-1, 1), (-3, 3))


def near_deltas(rng: random.Random, tiers: tuple[tuple[int, ...], ...] = NEAR_SLIPS):
    """The slips of `tiers` in order of preference, each tier's order drawn from `rng` when it is reached."""
    for tier in tiers:
        deltas = list(tier)
        rng.shuffle(deltas)
        yield from deltas


def near_slip_solution(problem: LabProblem, rng: random.Random, taken: Collection[int] = ()
                       ) -> tuple[list[Step], int]:
    """Like `final_slip_solution`, but always a near slip: the last step's result off by 2 (either sign, in
    random order), by 1 where that is negative or in `taken` (the answers the item already has), then by 3.
    A model that does not compute the last step cannot reject it from the digits' look, so the base model's
    ranking on one-step sums stays well below its ceiling."""
    last = len(problem.steps) - 1
    for delta in near_deltas(rng):
        steps, final = solve(problem.start, problem.events, corrupt_at=last, delta=delta)
        if final >= 0 and final != problem.answer and final not in taken:
            return steps, final
    raise RuntimeError(f"no near slip of the last step of {problem.id} gives a new answer")


def wrong_rule_solution(problem: LabProblem, rng: random.Random, taken: Collection[int] = ()
                        ) -> tuple[list[Step], int]:
    """For the glyph task (x ◇ b = 2 * x + b): the operator applied with a plausible wrong rule, every equation
    right — the operands' roles swapped (2 * b + x) or a 3 for the 2 (3 * x + b) — so a model that does not
    know the rule cannot reject it by checking arithmetic. Returns (steps, answer)."""
    rules = ["swap", "triple"]
    rng.shuffle(rules)
    for rule in rules:
        steps: list[Step] = []
        total = problem.start
        for ev in problem.events:
            if ev[0] != "glyph":
                raise ValueError(f"wrong_rule_solution needs a glyph problem, got event {ev!r} in {problem.id}")
            left, right = (2, ev[1]) if rule == "swap" else (3, total)
            double = Step("*", left, right, left * right)
            add = ev[1] if rule == "triple" else total
            steps += [double, Step("+", double.result, add, double.result + add)]
            total = double.result + add
        if total != problem.answer:
            return steps, total
    raise RuntimeError(f"no wrong rule changes the answer of {problem.id}")


# kind -> (problem, rng, taken) -> (steps, wrong answer); `taken`: the answers the item already has (only
# "near" reads it; the others draw again until the answer is new)
DISTRACTORS = {"misread": misread_solution, "corrupt": corrupt_solution, "final": final_slip_solution,
               "rule": wrong_rule_solution, "near": near_slip_solution}
DISTRACTOR_KINDS = tuple(DISTRACTORS)


def ranking_items(problems: list[LabProblem], distractors: int, seed: int, *, kind: str | tuple[str, ...] = "misread"
                  ) -> list[dict[str, Any]]:
    """For answer ranking: per problem the correct demonstration first, then `distractors` wrong ones whose
    final answers all differ from each other and the correct one. `kind` (one, or a tuple cycled over the
    distractor slots): "misread": one number read wrong from the question, every equation right
    (`misread_solution`); "final": the last step's result slipped, stated as the answer (`final_slip_solution`);
    "near": the same, always a slip of ±2 (±1, ±3 where needed; `near_slip_solution`);
    "rule": the glyph operator under a wrong rule, every equation right (`wrong_rule_solution`); "corrupt":
    one step off, carried to the end (`corrupt_solution`). A slot whose kind cannot give a new answer falls
    back to the next kind. Returns [{id, prompt, candidates: [correct, wrong, ...], answers, kinds}]."""
    if distractors < 1:
        raise ValueError(f"distractors must be >= 1, got {distractors}")
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not kinds or any(k not in DISTRACTORS for k in kinds):
        raise ValueError(f"distractor kind must be one of {DISTRACTOR_KINDS}, got {kind!r}")
    rng = random.Random(f"rank:{seed}" if kinds == ("corrupt",) else f"rank-{'-'.join(kinds)}:{seed}")
    items = []
    for p in problems:
        texts, answers, made = [solution_text(p.steps, p.answer, style=p.style)], [p.answer], []
        for slot in range(distractors):
            for attempt in range(100 * len(kinds)):
                k = kinds[(slot + attempt // 100) % len(kinds)]
                steps, wrong = DISTRACTORS[k](p, rng, taken=answers)
                if wrong not in answers:
                    texts.append(solution_text(steps, wrong, style=p.style))
                    answers.append(wrong)
                    made.append(k)
                    break
            else:
                raise RuntimeError(f"could not build {distractors} distinct distractors for {p.id}")
        items.append({"id": p.id, "prompt": p.prompt, "candidates": texts, "answers": answers, "kinds": made})
    return items


# ---------------------------------------------------------------------------------------------
# in-domain, strong prior: one-step sums and differences
# ---------------------------------------------------------------------------------------------

def sum_problems(n: int, seed: int, *, p_difference: float = 0.5) -> list[LabProblem]:
    """`n` one-step problems "What is 8 + 5?" / "What is 9 - 4?" (single-digit operands, results >= 0; a
    difference with probability `p_difference`): a task SmolLM2-135M-Instruct already does well, so its
    demonstrations are probable under the base model (a strong prior). Same solution format and noise as
    the shop task (one event)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= p_difference <= 1.0:
        raise ValueError(f"p_difference must be in [0, 1], got {p_difference}")
    rng = random.Random(f"sum:{seed}")
    out = []
    for i in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        if rng.random() < 1.0 - p_difference:
            question, events = f"What is {a} + {b}?", [("add", b)]
        else:
            a, b = max(a, b) + rng.randint(0, 9), min(a, b)
            question, events = f"What is {a} - {b}?", [("sub", b)]
        out.append(LabProblem(id=f"sum/{seed}/{i}", task="sum", question=question,
                              answer=solve(a, events)[1], events=events, start=a))
    return out


# ---------------------------------------------------------------------------------------------
# in-domain, weak prior: an invented operator
# ---------------------------------------------------------------------------------------------

def glyph_problems(n: int, seed: int, *, operators: tuple[int, int] = (1, 2)) -> list[LabProblem]:
    """`n` problems "What is 7 ◇ 3 ◇ 4?" with an invented operator x ◇ b = 2 * x + b, applied left to right
    (1-2 operators, single-digit numbers). Nothing tells the model the rule: it is learned from the
    demonstrations alone, written in a compact notation no model has seen either (`2*7=14;14+3=17;2*17=34;
    34+4=38. The answer is 38.`), so the base model's prior on these tokens is weak."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"glyph:{seed}")
    out = []
    for i in range(n):
        numbers = [rng.randint(2, 9) for _ in range(rng.randint(*operators) + 1)]
        events = [("glyph", b) for b in numbers[1:]]
        out.append(LabProblem(id=f"glyph/{seed}/{i}", task="glyph", question=f"What is {' ◇ '.join(map(str, numbers))}?",
                              answer=solve(numbers[0], events)[1], events=events, start=numbers[0], style="compact"))
    return out


# ---------------------------------------------------------------------------------------------
# out-of-domain: unit conversion
# ---------------------------------------------------------------------------------------------

_CONVERSIONS = (
    ("minutes", "hours", 60), ("seconds", "minutes", 60), ("hours", "days", 24), ("days", "weeks", 7),
    ("months", "years", 12), ("centimeters", "meters", 100), ("grams", "kilograms", 1000),
    ("meters", "kilometers", 1000), ("eggs", "dozens", 12), ("cents", "dollars", 100),
)


def convert_problems(n: int, seed: int) -> list[LabProblem]:
    """`n` one-step unit conversions ("How many minutes are in 7 hours?"); answer = k * factor."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"convert:{seed}")
    out = []
    for i in range(n):
        small, big, factor = rng.choice(_CONVERSIONS)
        k = rng.randint(2, 9)
        question = f"How many {small} are in {k} {big}?"
        out.append(LabProblem(id=f"convert/{seed}/{i}", task="convert", question=question, answer=k * factor,
                              meta={"factor": factor, "k": k}))
    return out


# ---------------------------------------------------------------------------------------------
# answer checking
# ---------------------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"answer is\s*:?\s*\$?(-?[\d,]+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final(response: str) -> int | None:
    """The final integer a response states: the last 'answer is N', else the last number in the text
    (a \\boxed{N} also ends as the last number). None when there is none or it is not an integer."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    found = _ANSWER_RE.findall(response)
    text = found[-1] if found else (_NUMBER_RE.findall(response) or [None])[-1]
    if text is None:
        return None
    text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value == int(value) else None


def stated_answer(response: str) -> int | None:
    """The integer in the response's last 'answer is N', or None when it states no answer (a format
    failure: no fallback to other numbers)."""
    found = _ANSWER_RE.findall(response)
    if not found:
        return None
    try:
        value = float(found[-1].replace(",", ""))
    except ValueError:
        return None
    return int(value) if value == int(value) else None


def is_correct(response: str, answer: int) -> bool:
    """Whether the response's final answer equals `answer` exactly."""
    return extract_final(response) == int(answer)
