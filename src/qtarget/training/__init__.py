"""Training on the Hugging Face stack: `QTargetConfig` (TrainingArguments), `QTargetTrainer`
(Trainer with the fused q-target loss, teacher / reference models, PSFT's schedule) and `train()`.

    from qtarget.training import QTargetConfig, train
    result = train(QTargetConfig(output_dir="out", objective="dft", max_steps=100), model="smollm2",
                   train_dataset="data.jsonl")
    result.history[-1]["loss"]
"""
from __future__ import annotations

from qtarget.lazy import lazy_attributes

# Loaded on first use: `qtarget.training.patch` needs transformers alone (the 'patch' extra, >= 5.6),
# the trainer the whole 'hf' extra.
_EXPORTS = {"QTargetConfig": "config", "QTargetTrainer": "trainer", "train": "api", "TrainResult": "api",
            "check_requirements": "api"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, {name: "." + module for name, module in _EXPORTS.items()})

