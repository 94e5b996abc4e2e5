"""A lab task is a value: `LabTask` holds everything the lab trains on and measures for one task, so the
runner, the metrics and the report never ask which task they got.

    from qtarget.lab.builtin_tasks import build_task
    task = build_task("glyph", settings)        # a built-in task (qtarget.lab.builtin_tasks.glyph_task)
    rows = task.demonstrations(seed, n, noise)   # training rows of one seed

A new task is a function `(settings: LabSettings) -> LabTask` (sizes from `settings.eval_in_domain`,
`rank_items`, `rank_distractors`, `ood_texts`, `ood_max_tokens`; evaluation sets from `settings.seed`), listed in
`qtarget.lab.builtin_tasks.BUILTIN_TASKS` or handed to `run_lab(..., task=...)`.

Fields (all plain data, except the two functions):

- `name`, `version`: the task's short name ("glyph") and the version of its generator; both are part of the
  target_sft teacher's cache key, so bump `version` whenever the data a seed gives change.
- `description`, `noise_description`: one sentence each for the report (what a demonstration looks like; what
  a noisy one is).
- `instruction`: the system turn of every chat (training, scoring, generation); None: no system turn.
- `demonstrations(seed, n, noise) -> list[dict]`: `n` training rows from seed stream `seed`, a `noise` share of
  them noisy, none of them sharing a prompt with the evaluation sets below. Each row has `prompt`, `response`
  and `noise` ("clean" or the kind of noise, e.g. "corrupt", "alternative"); for the noise-fit metric a noisy
  row also has `clean_response` (what the demonstration should have been) and a clean row
  `counterfactual_response` (a corruption it did not get): the tokens in which the two responses differ are
  the tokens noise fit measures. Rows without them are trained on but not measured for noise fit.
  `demonstrations(seed, n, 0.0)` must give clean rows (the target_sft teacher trains on them).
- `generation`: held-out problems answered greedily (`qtarget.evaluation.Problem`; `answer` as
  `parse_answer` writes it);
- `parse_answer(response) -> str | None`: the final answer a response states, None when it states none (a
  format failure, counted apart from a wrong answer). Correct = `parse_answer(response) == problem.answer`.
- `ranking`: held-out teacher-forced items `{"id", "prompt", "candidates": [correct, distractor, ...]}`; the
  correct candidate also gives the held-out NLL and entropy. Distractors should be wrong in a way the base
  model does not already reject (else answer ranking sits at its ceiling and separates nothing).
- `ood`: out-of-domain paragraphs (plain text) for forgetting.
- `example`: `{"prompt", "response"}`, one clean demonstration shown in the report.
- `chat_template`: True (the built-in tasks): every sequence is a chat through the tokenizer's template; False
  (your plain prompt/completion rows, read as `qtarget train` reads them): prompt + response + eos, and the
  generation problems carry their prompt tokens (`Problem.meta["prompt_ids"]`).
- `answer_form`: the form in which a response states its final answer (`qtarget.evaluation.answers.ANSWER_FORMS`:
  "answer_is", "boxed", "hashes"); a response that states none in that form is a format failure. None: the
  demonstrations state no answer in a recognisable form, so format failures are not measured and
  `format_note` says why.

A task's prior profile (how probable its demonstration tokens already are under the base model) is not a
field: the runner measures it from the base model's token scores (`qtarget.lab.metrics.prior_profile`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from qtarget.evaluation import Problem


@dataclass(frozen=True)
class LabTask:
    """Everything the lab needs from one task (see the module docstring for each field's contract)."""

    name: str
    version: str
    description: str
    noise_description: str
    instruction: str | None
    demonstrations: Callable[[int, int, float], list[dict[str, Any]]]
    generation: tuple[Problem, ...]
    parse_answer: Callable[[str], str | None]
    ranking: tuple[dict[str, Any], ...]
    ood: tuple[str, ...]
    example: dict[str, str]
    chat_template: bool = True
    answer_form: str | None = "answer_is"
    format_note: str = ""

    def __post_init__(self) -> None:
        for field_name in ("generation", "ranking", "ood"):
            if not getattr(self, field_name):
                raise ValueError(f"lab task {self.name!r}: {field_name} is empty")
        for i, item in enumerate(self.ranking):
            if len(item.get("candidates", ())) < 2:
                raise ValueError(f"lab task {self.name!r}: ranking item {i} ({item.get('id')}) needs the correct "
                                 f"candidate and at least one distractor")
        sizes = {len(item["candidates"]) for item in self.ranking}
        if len(sizes) != 1:
            raise ValueError(f"lab task {self.name!r}: every ranking item needs the same number of candidates, "
                             f"got {sorted(sizes)}")

    @property
    def n_candidates(self) -> int:
        """Candidates per ranking item (the correct one + distractors)."""
        return len(self.ranking[0]["candidates"])

    def is_correct(self, response: str, problem: Problem) -> bool:
        return self.parse_answer(response) == problem.answer
