"""The output folder of a training run: refuse to mix two runs in one folder, and refuse to resume a
checkpoint on other data or settings.

A run records its fingerprint in ``output_dir/qtarget_run.json`` and in every checkpoint: the settings
that decide its trajectory (RUN_KEYS: model, objective, optimiser, batch, LoRA, seed, tokenisation, ...)
and a hash of its tokenised training rows. Then

- a new run into a folder that already holds another run's outputs is refused unless
  ``overwrite_output_dir`` (which removes those outputs first) or ``resume``;
- ``resume`` refuses a checkpoint whose fingerprint differs, naming every key that differs. Keys that only
  extend or observe a run (max_steps, num_train_epochs, logging, saving, evaluation) may change.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from qtarget.teacher_cache.schema import data_fingerprint, row_fingerprint
from qtarget.training.config import QTargetConfig, _plain

RUN_FILE = "qtarget_run.json"
# Settings that decide which weights a run produces step by step (its data is fingerprinted separately).
RUN_KEYS = (
    "model", "dtype", "teacher_dtype", "ref_dtype", "objective", "objective_args", "teacher_model", "teacher_cache",
    "teacher_tail", "ref_model",
    "psft_updates_per_batch", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "max_length", "response_only", "chat_template", "packing", "seed", "data_seed", "learning_rate",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type",
    "warmup_ratio", "warmup_steps", "optim", "per_device_train_batch_size", "gradient_accumulation_steps",
    "bf16", "fp16",
)
# What a run writes into output_dir (besides files a user may keep there, which are left alone).
RUN_OUTPUTS = ("config.yaml", RUN_FILE, "metrics.jsonl", "metrics.csv", "curves.png", "final", ".qtarget-staging")


def rows_digest(examples: Sequence[Any]) -> dict[str, Any]:
    """Row count and a hash of the tokenised rows in order (input_ids, labels, position_ids, token_weights,
    loss_weights);
    empty for a stream without a length (nothing to compare then)."""
    if not hasattr(examples, "__len__") or not hasattr(examples, "__getitem__"):
        return {}
    weights, rows = hashlib.sha256(), []
    for i in range(len(examples)):
        example = examples[i]
        rows.append(row_fingerprint(example))
        if example.get("token_weights") is not None:
            weights.update(json.dumps([i, [float(x) for x in example["token_weights"]]]).encode())
        if example.get("loss_weights") is not None:  # prompt_loss_weight (absent when off: digests unchanged)
            weights.update(json.dumps([i, "loss", [float(x) for x in example["loss_weights"]]]).encode())
    return {"rows": len(rows), "fingerprint": f"{data_fingerprint(rows)}-{weights.hexdigest()[:8]}"}


def run_fingerprint(config: QTargetConfig, train_examples: Sequence[Any]) -> dict[str, Any]:
    return {"settings": {k: _plain(getattr(config, k, None)) for k in RUN_KEYS},
            "train_data": rows_digest(train_examples)}


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: recorded -> now' for every setting and data property that differs."""
    out = []
    for section in ("settings", "train_data"):
        a, b = recorded.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                name = key if section == "settings" else f"training data {key}"
                out.append(f"{name}: {a.get(key)!r} there, {b.get(key)!r} now")
    return out


def read_fingerprint(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / RUN_FILE)


def run_outputs(folder: Path) -> list[str]:
    """Names in `folder` that a training run wrote (sorted; checkpoints included)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name in RUN_OUTPUTS or (p.is_dir() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")))


def resume_checkpoint(config: QTargetConfig) -> str | None:
    """The checkpoint folder `config.resume` names ('last' / True: the newest in output_dir), or None.
    Raises when there is none to resume from."""
    if not config.resume:
        return None
    out = Path(config.output_dir)
    if config.resume in ("last", True, "true"):
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise ValueError(f"--resume: output_dir {str(out)!r} has no {PREFIX_CHECKPOINT_DIR}-N folder to resume from "
                             f"(drop --resume to start a new run)")
        return last
    if not Path(config.resume).is_dir():
        raise FileNotFoundError(f"--resume: checkpoint folder {config.resume!r} does not exist")
    return str(config.resume)


def _found_outputs(config: QTargetConfig, fingerprint: dict[str, Any]) -> list[str]:
    """Another run's outputs in output_dir (none when only a start of this same run that died in set-up
    or before its first step left its config.yaml and fingerprint)."""
    out = Path(config.output_dir)
    found = run_outputs(out)
    if set(found) <= {"config.yaml", RUN_FILE} and read_fingerprint(out) == fingerprint:
        return []
    return found


def check_output_dir(config: QTargetConfig, fingerprint: dict[str, Any], checkpoint: str | None) -> None:
    """Refuse (ValueError naming the problem) a checkpoint of another run, or a new run into a folder that
    holds another run's outputs without overwrite_output_dir. Writes nothing: call before set-up."""
    out = Path(config.output_dir)
    if checkpoint is not None:
        recorded = read_fingerprint(Path(checkpoint)) or read_fingerprint(out)
        if recorded is None:
            warnings.warn(f"{checkpoint} records no run fingerprint ({RUN_FILE}): cannot check that it was trained on "
                          f"this data with these settings", stacklevel=3)
            return
        diff = differences(recorded, fingerprint)
        if diff:
            raise ValueError(f"--resume: {checkpoint} belongs to a run with other data or settings "
                             f"({'; '.join(diff)}); resume with that run's data and settings, or start anew "
                             f"with --overwrite_output_dir or another --output_dir")
        return
    found = _found_outputs(config, fingerprint)
    if found and not config.overwrite_output_dir:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ValueError(f"output_dir {str(out)!r} already holds a training run ({shown}): pass --resume to "
                         f"continue it, --overwrite_output_dir to replace it, or choose another --output_dir")


def claim_output_dir(config: QTargetConfig, fingerprint: dict[str, Any], checkpoint: str | None) -> None:
    """Once set-up succeeded (main process): remove another run's outputs (overwrite_output_dir, checked
    by `check_output_dir`) and record this run's fingerprint."""
    out = Path(config.output_dir)
    if checkpoint is None:
        for name in _found_outputs(config, fingerprint):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_fingerprint(out, fingerprint)
