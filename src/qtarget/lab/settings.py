"""Lab settings: one dataclass, presets (default, --quick, --long, --tiny), a stable hash.

Every objective gets the same model, data, steps, batch, learning rate, schedule and trainable layers;
only the objective (and its paper parameters, scaled to the model where the paper's value assumes a
bigger run) differs. The presets are sized for 2 CPU cores, not tuned for any objective.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtarget.lab.precision import resolve_precision
from qtarget.objectives import get_objective, list_objectives

OBJECTIVES = ("sft", "dft", "psft", "asft", "target_sft", "dft_floor", "prift")

# The papers' parameters (SPEC §3): PSFT eps 0.28 with M = 8 mini-batches per global batch (scaled to
# M = 4 for runs of a few dozen steps); ASFT lam 0.05 with the frozen base model as reference;
# Target-SFT eta 0.5. The literature's fixes for DFT's low-prior failure are rows of the general `target`
# objective (no special case): dft_floor = DFT's target with gamma floored, gamma = max(p_y, 0.2) (every
# token keeps at least a fifth of SFT's weight); prift = gamma = p_y read from the frozen base model instead
# of the online one (PriFT, arXiv 2606.09396).
OBJECTIVE_ARGS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dft": {},
    "psft": {"eps": 0.28},
    "asft": {"lam": 0.05},
    "target_sft": {"eta": 0.5},
    "dft_floor": {"gamma": "p_y", "residual": "student", "gamma_min": 0.2},
    "prift": {"gamma": "p_y", "residual": "student", "gamma_from": "reference"},
}
# rows that are not an objective of the same name: the objective they train with
ROW_OBJECTIVE = {"dft_floor": "target", "prift": "target"}


@dataclass
class LabSettings:
    """Everything that decides the numbers a lab run produces (the output folder does not)."""

    preset: str = "default"
    model: str = "smollm2"              # "smollm2" (real, cached) or "tiny" (random, for tests)
    objectives: tuple[str, ...] = OBJECTIVES
    seeds: int = 1                      # training seeds per objective: seed, seed+1, ...
    seed: int = 0
    noise: float = 0.3                  # share of demonstrations with a corrupted step / alternative form
    # the built-in tasks (qtarget.lab.builtin_tasks): glyph (weak prior), sum (strong prior); also shop
    tasks: tuple[str, ...] = ("glyph", "sum")
    # training (identical for every objective)
    train_examples: int = 192           # demonstrations per run (each seed draws its own)
    steps: int = 48                     # optimizer steps (2 epochs of the demonstrations)
    batch_size: int = 8                 # rows per optimizer step
    learning_rate: float = 3e-4
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    train_top_layers: int = 6           # only the top k decoder layers (+ final norm) are trained
    psft_updates_per_batch: int = 4
    curve_points: int = 3               # teacher-forced metrics after this many evenly spaced steps (the last: the end)
    max_length: int = 192
    # teacher for target_sft: SFT of the base model on more, clean demonstrations (cached)
    teacher_examples: int = 256
    teacher_steps: int = 48
    # evaluation: generation (greedy accuracy)
    eval_in_domain: int = 60            # held-out problems answered by generation (95 % half-width <= 0.13)
    max_new_tokens: int = 40            # a well-formed answer here is <= ~32 tokens
    eval_batch_size: int = 60
    # evaluation: teacher-forced (no generation)
    rank_items: int = 64                # held-out problems for answer ranking (and held-out entropy / NLL)
    rank_distractors: int = 2           # corrupted demonstrations ranked against the correct one
    ood_texts: int = 48                 # out-of-domain paragraphs for forgetting
    ood_max_tokens: int = 32
    score_batch_size: int = 16
    n_boot: int = 2000                  # bootstrap replicates per interval
    threads: int = 2
    # matrix products in bfloat16 (torch.autocast; float32 weights, optimizer and loss math) or all float32;
    # the same for the base model and every row (qtarget.lab.precision)
    # "auto": bf16 where the CPU multiplies bfloat16 natively, fp32 elsewhere; resolved when the settings are made
    precision: str = "auto"
    objective_args: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: dict(v) for k, v in OBJECTIVE_ARGS.items()})
    # a sweep: ((objective, parameter, (values...)), ...); several entries form a grid over one objective
    sweep: tuple = ()

    def __post_init__(self) -> None:
        self.objectives = tuple(self.objectives)
        self.tasks = tuple(self.tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks: give one or more distinct task names, got {list(self.tasks)}")
        # any registered objective; those without an entry in OBJECTIVE_ARGS train with their registry defaults
        unknown = [o for o in self.objectives if o not in list_objectives() and o not in ROW_OBJECTIVE]
        if self.sweep:
            unknown = []  # a sweep decides its rows (sft + the swept objective)
        if unknown:
            raise ValueError(f"--objectives: unknown objective(s) {unknown}; choose from "
                             f"{', '.join(list(ROW_OBJECTIVE) + list_objectives())}")
        if not self.objectives:
            raise ValueError("--objectives: give at least one objective")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"--noise must be in [0, 1] (share of noisy demonstrations), got {self.noise}")
        for name in ("seeds", "steps", "batch_size", "train_examples", "teacher_examples", "teacher_steps",
                     "eval_in_domain", "max_new_tokens", "eval_batch_size", "rank_items", "rank_distractors",
                     "ood_texts", "ood_max_tokens", "score_batch_size", "psft_updates_per_batch", "threads",
                     "curve_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        self.precision = resolve_precision(self.precision)
        if self.train_top_layers < 0:
            raise ValueError(f"--train_top_layers must be >= 0 (0 = all layers), got {self.train_top_layers}")
        if self.n_boot < 100:
            raise ValueError(f"--n_boot must be >= 100, got {self.n_boot}")
        self.sweep = tuple((o, p, tuple(v)) for o, p, v in self.sweep)
        if self.sweep and len({o for o, _, _ in self.sweep}) != 1:
            raise ValueError(f"--sweep: every swept parameter must belong to one objective, got "
                             f"{sorted({o for o, _, _ in self.sweep})}")
        if self.model not in ("smollm2", "tiny") and not Path(self.model).is_dir():
            raise ValueError(f"--model must be 'smollm2', 'tiny' or a model folder, got {self.model!r}")

    @property
    def needs_teacher(self) -> bool:
        return any("teacher" in get_objective(o, **a).needs for _, o, a in self.runs())

    def runs(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(row name, objective, its parameters) of every trained row: the objectives (and the named rows of
        ROW_OBJECTIVE), or sft plus the sweep's points."""
        if not self.sweep:
            return [(o, ROW_OBJECTIVE.get(o, o), dict(self.objective_args.get(o, {}))) for o in self.objectives]
        objective = self.sweep[0][0]
        points: list[dict[str, Any]] = [{}]
        for _, param, values in self.sweep:
            points = [{**pt, param: v} for pt in points for v in values]
        base_args = dict(self.objective_args.get(objective, {}))
        return [("sft", "sft", {})] + [(row_name(objective, {**base_args, **pt}, self.sweep), objective,
                                        {**base_args, **pt}) for pt in points]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objectives"] = list(self.objectives)
        d["tasks"] = list(self.tasks)
        d["sweep"] = [[o, p, list(v)] for o, p, v in self.sweep]
        return d

    def digest(self, keys: tuple[str, ...] | None = None) -> str:
        """Stable short hash of the settings (or of a subset of them)."""
        d = self.to_dict()
        if keys is not None:
            d = {k: d[k] for k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def row_name(objective: str, args: dict[str, Any], sweep: tuple) -> str:
    """A sweep row's label: the objective, plus the swept parameters' values."""
    if not sweep or objective != sweep[0][0]:
        return objective
    return objective + " " + " ".join(f"{p}={args[p]}" for _, p, _ in sweep)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # both tasks and every row, cut to what fits 5 minutes on 2 cores with native bf16: 16 steps, 32 ranking
    # items, 32 OOD paragraphs of 24 tokens, metrics at the end only (no learning curves: an intermediate
    # checkpoint cost a sixth of the run); the 20 generation problems are a check of the output format. The
    # teacher is the default preset's (one cached teacher per task serves every preset)
    "quick": dict(steps=16, train_examples=64, eval_in_domain=20, eval_batch_size=20, rank_items=32, ood_texts=32,
                  ood_max_tokens=24, curve_points=1),
    # the default run over 3 training seeds (intervals then resample seeds too)
    "long": dict(seeds=3),
    # a random 2-layer model on the real tokenizer: the whole pipeline at toy scale, for the test suite
    "tiny": dict(model="tiny", steps=4, batch_size=2, train_examples=10, teacher_examples=8, teacher_steps=2,
                 eval_in_domain=4, max_new_tokens=8, eval_batch_size=4, rank_items=6, ood_texts=6,
                 ood_max_tokens=24, score_batch_size=4, n_boot=200, train_top_layers=1, psft_updates_per_batch=2,
                 learning_rate=1e-3, max_length=160, curve_points=2),
}


def settings_for(preset: str = "default", **overrides: Any) -> LabSettings:
    """The preset's settings with `overrides` (None values are ignored) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {"preset": preset, **PRESETS[preset]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return LabSettings(**values)
