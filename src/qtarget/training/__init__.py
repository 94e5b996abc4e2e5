"""Training on the Hugging Face stack: `QTargetConfig` (TrainingArguments), `QTargetTrainer`
(Trainer with the fused q-target loss, teacher / reference models, PSFT's schedule) and `train()`.

    from qtarget.training import QTargetConfig, train
    result = train(QTargetConfig(output_dir="out", objective="dft", max_steps=100), model="smollm2",
                   train_dataset="data.jsonl")
    result.history[-1]["loss"]
"""
from __future__ import annotations

from qtarget.training.api import TrainResult, check_requirements, train
from qtarget.training.config import QTargetConfig
from qtarget.training.trainer import QTargetTrainer

__all__ = ["QTargetConfig", "QTargetTrainer", "train", "TrainResult", "check_requirements"]

