"""PSFT's pi_old schedule: refreshed exactly every M optimizer steps, also when a global batch of M
mini-batches crosses an epoch boundary, and every mini-batch is scored by the weights of its global
batch's first step (checked against full logits of a copy of the model taken at that step)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from qtarget.data import prepare_data
from qtarget.training import QTargetTrainer
from test_train_support import config, tiny, tokenizer, toy_rows


class Recorder(QTargetTrainer):
    """Keeps each training micro-batch's inputs and old log-probs, by optimizer step (1-based)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, dict]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append((self.state.global_step + 1, {k: v.detach().clone() for k, v in inputs.items()}))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class CopyAtStepStart(TrainerCallback):
    """A frozen copy of the model as it is when each optimizer step begins."""

    def __init__(self) -> None:
        self.models: dict[int, torch.nn.Module] = {}
        self.trainer = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.models[state.global_step + 1] = copy.deepcopy(self.trainer.model).eval()


def label_logprobs(model, batch) -> torch.Tensor:
    """log p(labels[t]) from full logits, 0 at t = 0 and at ignored labels (the reference for old_logprobs)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        logits = lm.__class__.forward(lm, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(batch["labels"].shape, dtype=torch.float64)
    out[:, 1:] = torch.where(labels != -100, logp, 0.0)
    return out


# (rows, per-device batch, gradient accumulation, M, epochs): optimizer steps per epoch and where the global
# batches fall against the epoch boundaries differ from case to case
CASES = [
    (24, 8, 1, 2, 2),  # 3 steps per epoch: global batches (1,2) (3,4) (5,6); (3,4) crosses the boundary
    (20, 4, 1, 3, 2),  # 5 steps per epoch: (1-3) (4-6) (7-9) (10)
    (10, 4, 1, 2, 3),  # 3 steps of 4, 4, 2 rows per epoch (rows do not divide)
    (14, 2, 3, 2, 2),  # 7 micro-batches, 3 per step: steps of 3, 3, 1 micro-batches per epoch
]


@pytest.mark.parametrize("rows,batch,accum,M,epochs", CASES)
def test_old_policy_refreshes_every_m_steps_across_epochs(tmp_path, rows, batch, accum, M, epochs):
    tok = tokenizer()
    data = prepare_data(toy_rows(rows), tok, max_length=48)
    cfg = config(tmp_path, objective="psft", psft_updates_per_batch=M, max_steps=-1, num_train_epochs=epochs,
                 per_device_train_batch_size=batch, gradient_accumulation_steps=accum, learning_rate=5e-2)
    copies = CopyAtStepStart()
    trainer = Recorder(model=tiny(), args=cfg, train_dataset=data.train, processing_class=tok, callbacks=[copies])
    copies.trainer = trainer
    trainer.train()

    steps_per_epoch = -(-(-(-rows // batch)) // accum)
    total = steps_per_epoch * epochs
    assert trainer.state.global_step == total
    assert trainer.psft_refresh_steps == list(range(1, total + 1, M))
    assert trainer.psft_refreshes == len(trainer.psft_refresh_steps)
    assert {step for step, _ in trainer.seen} == set(range(1, total + 1))
    crossing = [s for s in range(steps_per_epoch, total, steps_per_epoch) if (s - 1) // M == s // M]
    assert crossing  # a global batch whose steps s and s + 1 lie in two epochs
    for step, inputs in trainer.seen:
        first = (step - 1) // M * M + 1  # the global batch's first optimizer step: pi_old = the model then
        want = label_logprobs(copies.models[first], inputs)
        got = inputs["old_logprobs"].double()
        assert torch.allclose(got, want, atol=2e-5), (step, first, float((got - want).abs().max()))
        if step != first:  # the model has moved since: pi_old is not the current model (the test can fail)
            now = label_logprobs(copies.models[step], inputs)
            assert float((now - want).abs().max()) > 1e-4, step
