"""LLaMA-Factory's own training run with a qtarget objective: its `run_exp` with a callback that patches
its model (`qtarget.patch`), so the model's forward returns the objective's loss inside LLaMA-Factory's
trainer. `llamafactory-cli` passes no callbacks, so this launcher is the entry point:

    python -m qtarget.integrations.llamafactory config.yaml --objective dft [key=value ...]
    python -m qtarget.integrations.llamafactory config.yaml --objective target_sft --objective_args eta=0.5 \\
        --teacher path/to/teacher

config.yaml is a LLaMA-Factory training config (stage sft or pt); key=value overrides it as on
llamafactory-cli's command line. The qtarget settings may also sit in the YAML as `qtarget_objective`,
`qtarget_objective_args` (a mapping), `qtarget_teacher`, `qtarget_teacher_dtype`; the flags win. All of
LLaMA-Factory's own loss switches (use_dft_loss, use_eaft_loss, use_asft_loss) must be off: the objective
replaces them. psft (log pi_old on its own schedule) and token_weighted (per-token weights in the batch) need
inputs LLaMA-Factory's batches do not carry; use `qtarget train` for them.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, TrainerCallback

from qtarget.objectives import Objective, get_objective
from qtarget.training.patch import patch

LOSS_FLAGS = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")
STAGES = ("sft", "pt")
YAML_KEYS = {"qtarget_objective": "objective", "qtarget_objective_args": "objective_args",
             "qtarget_teacher": "teacher", "qtarget_teacher_dtype": "teacher_dtype"}
TEACHER_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BATCH_INPUTS = {"old_logprobs": "log pi_old of the labels on PSFT's schedule",
                "token_weights": "per-token weights in the batch"}


class QTargetCallback(TrainerCallback):
    """Patches the trainer's model with the objective when the trainer is built (on_init_end: after
    LLaMA-Factory's trainer took the model, before accelerate prepares it). A teacher given as a folder
    is loaded then, in the student's dtype (or `teacher_dtype`) on the student's device."""

    def __init__(self, objective: Objective, teacher: str | torch.nn.Module | None = None,
                 teacher_dtype: str = "auto") -> None:
        self.objective = objective
        self.teacher = teacher
        self.teacher_dtype = teacher_dtype
        self.patched: torch.nn.Module | None = None

    def _teacher_model(self, student: torch.nn.Module) -> torch.nn.Module | None:
        if self.teacher is None or isinstance(self.teacher, torch.nn.Module):
            return self.teacher
        dtype = TEACHER_DTYPES[self.teacher_dtype] or next(student.parameters()).dtype
        device = next(student.parameters()).device
        return AutoModelForCausalLM.from_pretrained(self.teacher, dtype=dtype).to(device)

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None:
            raise ValueError("LLaMA-Factory's trainer passed no model to its callbacks; qtarget cannot patch it")
        patch(model, self.objective, teacher=self._teacher_model(model), tokenizer=processing_class)
        self.patched = model
        return control


def parse_objective_args(value: Any) -> dict[str, Any]:
    """A mapping, or 'eta=0.5,lam=0.1' (values read as YAML scalars)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    out = {}
    for part in str(value).split(","):
        if not part.strip():
            continue
        key, eq, text = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--objective_args: cannot read {part.strip()!r}: expected key=value pairs separated by "
                             f"commas (e.g. eta=0.5,lam=0.1)")
        out[key.strip()] = yaml.safe_load(text.strip())
    return out


def check_args(lf_args: dict[str, Any], objective: Objective, teacher: str | None) -> None:
    """Refuse LLaMA-Factory settings under which the patched forward's loss would not be the objective's."""
    stage = lf_args.get("stage", "sft")
    if stage not in STAGES:
        raise ValueError(f"stage: {stage!r} is not supported by the qtarget launcher (token-level objectives for "
                         f"stage {' or '.join(STAGES)})")
    on = [flag for flag in LOSS_FLAGS if lf_args.get(flag)]
    if on:
        raise ValueError(f"{', '.join(on)}: LLaMA-Factory's own loss would replace the patched one; turn it off and "
                         f"choose the objective with --objective (e.g. --objective dft)")
    if float(lf_args.get("label_smoothing_factor", 0) or 0) > 0:
        raise ValueError("label_smoothing_factor: label smoothing needs the full logits; set it to 0 (qtarget's "
                         "objectives define the target instead, e.g. --objective label_smoothing)")
    for need, what in BATCH_INPUTS.items():
        if need in objective.needs:
            raise ValueError(f"--objective {objective.name}: it needs {what}, which LLaMA-Factory's batches do not "
                             f"carry; use `qtarget train` for it")
    if "teacher" in objective.needs and teacher is None:
        raise ValueError(f"--objective {objective.name}: it needs a teacher: pass --teacher PATH (a model folder "
                         f"with the student's vocabulary)")
    if teacher is not None and "teacher" not in objective.needs:
        raise ValueError(f"--teacher: objective {objective.name!r} reads no teacher")
    if teacher is not None and not os.path.isdir(teacher):
        raise OSError(f"--teacher: no model folder at {teacher}")


def parse_command_line(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LLaMA-Factory's arguments, qtarget settings) from `config.yaml [--objective ...] [key=value ...]`
    (values read as YAML scalars, as llamafactory-cli's command line reads them)."""
    parser = argparse.ArgumentParser(prog="python -m qtarget.integrations.llamafactory",
                                     description="LLaMA-Factory's run_exp with a qtarget objective as the loss.")
    parser.add_argument("config", help="LLaMA-Factory training YAML (stage sft or pt)")
    parser.add_argument("--objective", default=None, help="qtarget objective (default sft)")
    parser.add_argument("--objective_args", default=None, help="its parameters, e.g. eta=0.5,lam=0.1")
    parser.add_argument("--teacher", default=None, help="teacher model folder (objectives that read a teacher)")
    parser.add_argument("--teacher_dtype", default=None, choices=sorted(TEACHER_DTYPES))
    known, overrides = parser.parse_known_args(argv)
    if not os.path.isfile(known.config):
        raise OSError(f"config: no file at {known.config}")
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise ValueError(f"unrecognized argument(s) {bad}: LLaMA-Factory overrides are key=value")
    with open(known.config, encoding="utf-8") as f:
        lf_args = yaml.safe_load(f) or {}
    if not isinstance(lf_args, dict):
        raise ValueError(f"config: {known.config} is not a YAML mapping of LLaMA-Factory arguments")
    for override in overrides:
        key, _, value = override.partition("=")
        lf_args[key.strip()] = yaml.safe_load(value)
    settings = {"objective": "sft", "objective_args": None, "teacher": None, "teacher_dtype": "auto"}
    for key, name in YAML_KEYS.items():
        if key in lf_args:
            settings[name] = lf_args.pop(key)
    for name in settings:
        if getattr(known, name) is not None:
            settings[name] = getattr(known, name)
    if settings["teacher_dtype"] not in TEACHER_DTYPES:
        raise ValueError(f"teacher_dtype: {settings['teacher_dtype']!r} is not one of {', '.join(TEACHER_DTYPES)}")
    return lf_args, settings


def prepare(lf_args: dict[str, Any], settings: dict[str, Any]) -> QTargetCallback:
    objective = get_objective(str(settings["objective"]), **parse_objective_args(settings["objective_args"]))
    check_args(lf_args, objective, settings["teacher"])
    return QTargetCallback(objective, settings["teacher"], settings["teacher_dtype"])


def run(lf_args: dict[str, Any], settings: dict[str, Any]) -> QTargetCallback:
    """Check everything, then LLaMA-Factory's run_exp with the patching callback."""
    callback = prepare(lf_args, settings)
    try:
        from llamafactory.train.tuner import run_exp  # noqa: PLC0415 - LLaMA-Factory, installed beside qtarget
    except ImportError as e:
        raise ImportError(f"the LLaMA-Factory launcher needs LLaMA-Factory: pip install llamafactory==0.9.5 "
                          f"(scripts/setup_llamafactory.sh; import failed: {e})") from None
    run_exp(args=lf_args, callbacks=[callback])
    return callback


def main(argv: list[str] | None = None) -> int:
    try:
        lf_args, settings = parse_command_line(sys.argv[1:] if argv is None else argv)
        run(lf_args, settings)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
