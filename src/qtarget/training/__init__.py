"""Training on the Hugging Face stack: `QTargetConfig` (TrainingArguments), `QTargetTrainer`
(Trainer with the fused q-target loss, teacher / reference models, PSFT's schedule) and `train()`.

    from qtarget.training import QTargetConfig, train
    result = train(QTargetConfig(output_dir="out", objective="dft", max_steps=100), model="smollm2",
                   train_dataset="data.jsonl")
    result.history[-1]["loss"]
"""
from __future__ import annotations

import importlib

# Loaded on first use: `qtarget.training.patch` needs transformers alone (the 'patch' extra, >= 5.6),
# the trainer the whole 'hf' extra.
_EXPORTS = {"QTargetConfig": "config", "QTargetTrainer": "trainer", "train": "api", "TrainResult": "api",
            "check_requirements": "api"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"qtarget.training.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qtarget.training' has no attribute {name!r}")

