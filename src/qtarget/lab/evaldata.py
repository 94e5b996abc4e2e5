"""What one task's models are measured on, fixed for the run, scored once with the base model.

`EvalData(settings, task, base, tokenizer, split)` tokenises the task's training demonstrations (per seed),
ranking candidates and out-of-domain paragraphs, scores each set with one `Scorer` (which keeps the frozen
trunk's output), and gives:
- `teacher_forced(model, seed)`: every teacher-forced per-item value of a model (ranking, held-out NLL and
  entropy, forgetting, noise fit on the seed's demonstrations);
- `trunk(seed)`: the seed's demonstrations' trunk, for training the top layers alone (`qtarget.lab.trunk`);
- `prior`: the task's prior profile (base p_y over the tokens of the first seed's clean demonstrations,
  `metrics.prior_profile`).
"""
from __future__ import annotations

import numpy as np

from qtarget.lab.metrics import (Scorer, changed_tokens, chat_sequence, nll_items, noise_fit_items, prior_profile,
                                 ranking_items, text_sequence)
from qtarget.lab.settings import LabSettings
from qtarget.lab.task import LabTask
from qtarget.lab.trunk import TrunkLookup


def tokenize(tokenizer, rows: list[dict], max_length: int, instruction: str | None, *, template: bool = True
             ) -> list[dict]:
    """prompt/response rows -> tokenised chat examples (system = the task's instruction, user = question,
    assistant = response; only the response is supervised); `template` False: prompt + response + eos."""
    return [chat_sequence(tokenizer, r["prompt"], r["response"], max_length, instruction=instruction,
                          template=template) for r in rows]


def contrast(row: dict) -> str | None:
    """The response whose token difference from `row`'s marks the tokens noise fit measures (see LabTask)."""
    return row.get("counterfactual_response" if row["noise"] == "clean" else "clean_response")


def settings_seeds(settings: LabSettings) -> list[int]:
    return [settings.seed + i for i in range(settings.seeds)]


class EvalData:
    """The task's evaluation sets and training demonstrations, scored once with the base model."""

    def __init__(self, settings: LabSettings, task: LabTask, base, tokenizer, split: int | None) -> None:
        self.settings, self.task = settings, task
        self.n_candidates = task.n_candidates
        self.train_rows = {s: task.demonstrations(s, settings.train_examples, settings.noise)
                           for s in settings_seeds(settings)}
        ml, instruction, tpl = settings.max_length, task.instruction, task.chat_template
        self.train_examples = {s: tokenize(tokenizer, rows, ml, instruction, template=tpl)
                               for s, rows in self.train_rows.items()}
        rank_seqs = [chat_sequence(tokenizer, it["prompt"], c, ml, instruction=instruction, template=tpl)
                     for it in task.ranking for c in it["candidates"]]
        ood_seqs = [text_sequence(tokenizer, t, settings.ood_max_tokens) for t in task.ood]
        # per seed, the demonstrations measured for noise fit (those with noise metadata): index, kind, tokens
        self.measured: dict[int, list[int]] = {}
        self.kinds: dict[int, list[str]] = {}
        self.changed: dict[int, list[np.ndarray]] = {}
        for s, rows in self.train_rows.items():
            # noisy rows: the tokens their noise changed; clean rows: the tokens a corruption would have changed
            self.measured[s] = [i for i, r in enumerate(rows) if contrast(r) is not None]
            self.kinds[s] = [rows[i]["noise"] for i in self.measured[s]]
            self.changed[s] = [changed_tokens(self.train_examples[s][i], chat_sequence(
                tokenizer, rows[i]["prompt"], contrast(rows[i]), ml, instruction=instruction, template=tpl))
                for i in self.measured[s]]
        kw = dict(pad_token_id=tokenizer.pad_token_id, split=split, batch_size=settings.score_batch_size)
        self.scorers = {"rank": Scorer(base, rank_seqs, **kw), "ood": Scorer(base, ood_seqs, **kw)}
        for s, examples in self.train_examples.items():
            self.scorers[f"train{s}"] = Scorer(base, examples, **kw)
        self.tokens_scored = sum(len(sc.base_scores) for sc in self.scorers.values())
        first = settings_seeds(settings)[0]
        clean = [i for i, r in enumerate(self.train_rows[first]) if r["noise"] == "clean"]
        base_scores = self.scorers[f"train{first}"].base_scores
        self.prior = prior_profile([base_scores[i] for i in clean] if clean else base_scores)
        self.split = split

    def trunk(self, seed: int) -> TrunkLookup | None:
        """The seed's demonstrations' hidden states entering the first trained layer (None: all layers train)."""
        return None if self.split is None else self.scorers[f"train{seed}"].trunk_lookup()

    def teacher_forced(self, model, seed: int | None) -> dict[str, np.ndarray]:
        """Per-item teacher-forced values of `model` (None: the base model) trained on seed `seed`'s data."""
        score = (lambda sc: sc.base_scores) if model is None else (lambda sc: sc.score(model))
        rank = ranking_items(score(self.scorers["rank"]), self.n_candidates)
        out = {"rank.correct": rank["correct"], "rank.margin": rank["margin"], "rank.entropy": rank["entropy"],
               "rank.nll": rank["nll"], "ood.nll": nll_items(score(self.scorers["ood"]))}
        if model is not None and self.measured[seed]:
            sc, keep = self.scorers[f"train{seed}"], self.measured[seed]
            scores = sc.score(model)
            noise = noise_fit_items([scores[i] for i in keep], [sc.base_scores[i] for i in keep], self.kinds[seed],
                                    self.changed[seed])
            out.update({f"noise.{k}": v for k, v in noise.items()})
        return out
