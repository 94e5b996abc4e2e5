"""qtarget.integrations.trl_loss inside TRL's SFTTrainer."""
from __future__ import annotations

import warnings

import datasets
import pytest
import torch

from qtarget.integrations import trl_loss
from test_train_support import tiny, tokenizer

trl = pytest.importorskip("trl")


def reference(objective: str, logits: torch.Tensor, labels: torch.Tensor, n: float) -> torch.Tensor:
    """Independent formulas on shifted positions: sft = -log p_y, dft = -sg(p_y) log p_y; sum / n."""
    z, y = logits[:, :-1].float(), labels[:, 1:]
    mask = y != -100
    logp_y = torch.log_softmax(z, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    per = -logp_y if objective == "sft" else -logp_y.exp() * logp_y
    return (per * mask).sum() / n


@pytest.mark.parametrize("objective", ["sft", "dft"])
def test_trl_sft_trainer_uses_the_objective(tmp_path, objective):
    tok = tokenizer()
    rows = [{"prompt": f"Q{i}: what is {i}+1?", "completion": f" It is {i + 1}."} for i in range(8)]
    seen = []
    inner = trl_loss(objective)

    def recording(outputs, labels, num_items_in_batch=None):
        loss = inner(outputs, labels, num_items_in_batch=num_items_in_batch)
        seen.append((outputs.logits.detach().clone(), labels.clone(), num_items_in_batch, loss.detach().clone()))
        return loss

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                         use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
                         max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = trl.SFTTrainer(model=tiny(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok, compute_loss_func=recording)
    trainer.train()
    assert len(seen) == 2
    for logits, labels, n, loss in seen:
        count = (labels[:, 1:] != -100).sum()
        assert n is not None and int(n) == int(count)  # global supervised-token count (1 process, no GA)
        assert ((labels[:, :3] == -100).all(dim=1)).all()  # completion-only labels: the prompt is masked
        assert float(loss) == pytest.approx(float(reference(objective, logits, labels, float(n))), rel=1e-5)


def test_trl_loss_refuses_objectives_needing_auxiliary_inputs():
    with pytest.raises(ValueError, match="needs .*teacher"):
        trl_loss("target_sft")
    with pytest.raises(ValueError, match="needs .*old_logprobs"):
        trl_loss("psft")
