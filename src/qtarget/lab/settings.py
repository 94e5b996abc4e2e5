"""Lab settings: one dataclass, three presets (default, --quick, --tiny), a stable hash.

Every objective gets the same model, data, steps, batch, learning rate, schedule and trainable layers;
only the objective (and its paper parameters, scaled to the model where the paper's value assumes a
bigger run) differs. The presets are sized for 2 CPU cores, not tuned for any objective.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

OBJECTIVES = ("sft", "dft", "psft", "asft", "target_sft")

# The papers' parameters (SPEC §3): PSFT eps 0.28 with M = 8 mini-batches per global batch (scaled to
# M = 4 for runs of a few dozen steps); ASFT lam 0.05 with the frozen base model as reference;
# Target-SFT eta 0.5.
OBJECTIVE_ARGS: dict[str, dict[str, float]] = {
    "sft": {},
    "dft": {},
    "psft": {"eps": 0.28},
    "asft": {"lam": 0.05},
    "target_sft": {"eta": 0.5},
}


@dataclass
class LabSettings:
    """Everything that decides the numbers a lab run produces (the output folder does not)."""

    preset: str = "default"
    model: str = "smollm2"              # "smollm2" (real, cached) or "tiny" (random, for tests)
    objectives: tuple[str, ...] = OBJECTIVES
    seeds: int = 1                      # training seeds per objective: seed, seed+1, ...
    seed: int = 0
    noise: float = 0.2                  # share of demonstrations with a corrupted step / alternative form
    # training (identical for every objective)
    train_examples: int = 128           # demonstrations per run (each seed draws its own)
    steps: int = 16                     # optimizer steps
    batch_size: int = 8                 # rows per optimizer step
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    train_top_layers: int = 6           # only the top k decoder layers (+ final norm) are trained
    psft_updates_per_batch: int = 4
    max_length: int = 192
    # teacher for target_sft: SFT of the base model on more, clean demonstrations (cached)
    teacher_examples: int = 256
    teacher_steps: int = 32
    # evaluation
    eval_in_domain: int = 48
    eval_ood: int = 48
    eval_entropy: int = 32              # held-out clean demonstrations for entropy / NLL
    max_new_tokens: int = 56
    eval_batch_size: int = 48
    threads: int = 2
    objective_args: dict[str, dict[str, float]] = field(default_factory=lambda: {k: dict(v) for k, v in OBJECTIVE_ARGS.items()})

    def __post_init__(self) -> None:
        self.objectives = tuple(self.objectives)
        unknown = [o for o in self.objectives if o not in OBJECTIVE_ARGS]
        if unknown:
            raise ValueError(f"--objectives: unknown lab objective(s) {unknown}; choose from {', '.join(OBJECTIVES)}")
        if not self.objectives:
            raise ValueError("--objectives: give at least one objective")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"--noise must be in [0, 1] (share of noisy demonstrations), got {self.noise}")
        for name in ("seeds", "steps", "batch_size", "train_examples", "teacher_examples", "teacher_steps",
                     "eval_in_domain", "eval_ood", "eval_entropy", "max_new_tokens", "eval_batch_size",
                     "psft_updates_per_batch", "threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.train_top_layers < 0:
            raise ValueError(f"--train_top_layers must be >= 0 (0 = all layers), got {self.train_top_layers}")
        if self.model not in ("smollm2", "tiny"):
            raise ValueError(f"model must be 'smollm2' or 'tiny', got {self.model!r}")

    @property
    def needs_teacher(self) -> bool:
        return "target_sft" in self.objectives

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objectives"] = list(self.objectives)
        return d

    def digest(self, keys: tuple[str, ...] | None = None) -> str:
        """Stable short hash of the settings (or of a subset of them)."""
        d = self.to_dict()
        if keys is not None:
            d = {k: d[k] for k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": dict(steps=8, train_examples=64, teacher_examples=128, teacher_steps=16, eval_in_domain=16,
                  eval_ood=16, eval_entropy=8, max_new_tokens=48, eval_batch_size=16),
    # a random 2-layer model on the real tokenizer: the whole pipeline at toy scale, for the test suite
    "tiny": dict(model="tiny", steps=4, batch_size=2, train_examples=8, teacher_examples=8, teacher_steps=2,
                 eval_in_domain=4, eval_ood=4, eval_entropy=4, max_new_tokens=8, eval_batch_size=4,
                 train_top_layers=1, psft_updates_per_batch=2, learning_rate=1e-3, max_length=160),
}


def settings_for(preset: str = "default", **overrides: Any) -> LabSettings:
    """The preset's settings with `overrides` (None values are ignored) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {"preset": preset, **PRESETS[preset]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return LabSettings(**values)
