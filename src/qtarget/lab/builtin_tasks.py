"""The lab's built-in tasks by name: each a function `(settings) -> LabTask` (see `qtarget.lab.task`).

- `glyph` (weak prior): an invented operator x ◇ b = 2 * x + b, chains of 1-2 operators, solved in a compact
  notation (`2*7=14;14+3=17. The answer is 17.`) that the base model cannot know; distractors: the operator
  under a wrong rule (every equation right) and a slipped last step.
- `sum` (strong prior): one-step sums and differences of small numbers, the format shown in the instruction
  (`8 + 5 = 13. The answer is 13.`), which SmolLM2-135M-Instruct already writes almost token for token;
  ranking items: differences four times in five, each against the result slipped by ±2 (±1 or ±3 where ±2
  would be negative), the problems and slips the base model gets wrong most, so its answer ranking stays well
  below the ceiling at every seed.
- `shop` (in between): multi-step word problems with one equation per step; distractors: a slipped last step
  and a misread number.
The prior class of each task is measured from the base model's profile, never taken from this list.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from qtarget.evaluation import Problem
from qtarget.lab.ood_text import ood_texts
from qtarget.lab.settings import LabSettings
from qtarget.lab.task import LabTask
from qtarget.lab.tasks import (EVAL_SEED, GLYPH_EVAL_SEED, INSTRUCTION, SUM_EVAL_SEED, TASK_VERSION, LabProblem,
                               demonstrations, glyph_problems, ranking_items, shop_problems, solution_text,
                               stated_answer, sum_problems)

# the strong-prior task shows its format in the instruction (a well-known format, stated); the glyph task's
# instruction says nothing about its operator or notation
SUM_INSTRUCTION = "Answer in this form: 2 + 3 = 5. The answer is 5."
# the sum task's ranking items are differences four times in five (training and generation: one in two). On
# 150 problems of a design-only stream the base model ranked the right result above both ±2 slips for 0.90
# of the sums and 0.44 of the differences (at the lab's own seeds, with differences 2 in 3: 0.67-0.70 on 64
# items); weighted 4 in 5 its ranking accuracy stays well below 0.85 at every seed and preset, leaving room
# both ways (tests/test_lab_distractors.py checks several seeds)
SUM_RANK_DIFFERENCES = 0.8
# the sum task's generator version (TASK_VERSION for the others): 5 since its ranking items are the above
SUM_VERSION = 5

NOISE_TEXT = ("half with a corrupted step (a wrong result carried to a wrong final answer), half in a non-unique "
              "alternative form (operands swapped, words instead of symbols, another closing phrase)")


def train_rows(generate, seed: int, n: int, noise: float, exclude: set[str]) -> list[dict[str, Any]]:
    """`n` demonstrations of `generate(n, seed)`'s problems, skipping those whose question is in `exclude`."""
    problems: list[LabProblem] = []
    extra = 0
    while len(problems) < n:
        batch = generate(n + extra, seed)
        problems = [p for p in batch if p.question not in exclude][:n]
        extra += max(8, n // 4)
    return demonstrations(problems, noise, seed)


def parse_int_answer(response: str) -> str | None:
    """The integer of the response's last 'answer is N' as a string, None for a format failure."""
    value = stated_answer(response)
    return None if value is None else str(value)


def arithmetic_task(settings: LabSettings, name: str, generate, description: str, stream: int, *,
                    instruction: str = INSTRUCTION, distractors: tuple[str, ...] = ("final", "misread"),
                    rank_generate=None, version: int = TASK_VERSION) -> LabTask:
    """A LabTask from a problem generator `generate(n, seed)`: generation problems from stream `stream` + seed,
    ranking problems from `stream` + seed + 1 (drawn by `rank_generate`, default `generate`; each against
    `rank_distractors` distractors of the kinds `distractors`, cycled; `qtarget.lab.tasks.ranking_items`),
    training rows from stream s for training seed s with every evaluated question left out, out-of-domain text
    from EVAL_SEED + seed (the same for every task)."""
    eval_seed = stream + settings.seed
    gen = generate(settings.eval_in_domain, eval_seed)
    rank_problems = (rank_generate or generate)(settings.rank_items, eval_seed + 1)
    exclude = {p.question for p in gen} | {p.question for p in rank_problems}
    return LabTask(
        name=name, version=str(version), description=description, noise_description=NOISE_TEXT,
        instruction=instruction,
        demonstrations=lambda seed, n, noise: train_rows(generate, seed, n, noise, exclude),
        generation=tuple(Problem(id=p.id, question=p.prompt, answer=str(p.answer), source=p.task) for p in gen),
        parse_answer=parse_int_answer,
        ranking=tuple(ranking_items(rank_problems, settings.rank_distractors, eval_seed, kind=distractors)),
        ood=tuple(ood_texts(settings.ood_texts, EVAL_SEED + settings.seed)),
        example={"prompt": gen[0].prompt, "response": solution_text(gen[0].steps, gen[0].answer, style=gen[0].style)},
    )


def shop_task(settings: LabSettings) -> LabTask:
    """The multi-step word problems (the base model rarely solves them, but writes most of their tokens)."""
    return arithmetic_task(settings, "shop", shop_problems, "procedural arithmetic word problems with a compact "
                           "chain of thought, one equation per step, ending in 'The answer is N.'", EVAL_SEED)


def sum_task(settings: LabSettings) -> LabTask:
    """One-step sums and differences of small numbers in a format the instruction shows (a strong prior)."""
    return arithmetic_task(settings, "sum", sum_problems, "one-step sums and differences of small numbers in the "
                           "format the instruction shows ('What is 8 + 5?' -> '8 + 5 = 13. The answer is 13.'), "
                           "which the base model already writes almost token for token", SUM_EVAL_SEED,
                           instruction=SUM_INSTRUCTION, distractors=("near",),
                           rank_generate=functools.partial(sum_problems, p_difference=SUM_RANK_DIFFERENCES),
                           version=SUM_VERSION)


def glyph_task(settings: LabSettings) -> LabTask:
    """An invented operator in an invented notation, learned from the demonstrations alone (a weak prior)."""
    return arithmetic_task(settings, "glyph", glyph_problems, "an invented operator x ◇ b = 2 * x + b (never "
                           "stated; learned from the demonstrations), chains of 1-2 operators solved in a compact "
                           "notation ('What is 7 ◇ 3?' -> '2*7=14;14+3=17. The answer is 17.')", GLYPH_EVAL_SEED,
                           distractors=("rule", "final"))


BUILTIN_TASKS: dict[str, Callable[[LabSettings], LabTask]] = {"glyph": glyph_task, "sum": sum_task, "shop": shop_task}


def build_task(name: str, settings: LabSettings) -> LabTask:
    """The built-in task `name` for `settings`' sizes and seed."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown lab task {name!r}; choose from {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name](settings)
