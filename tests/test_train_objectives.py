"""Every catalogue objective trains through QTargetTrainer on a tiny model (and SmolLM2-135M, slow)."""
from __future__ import annotations

import pytest
import torch

from qtarget import list_objectives
from qtarget.data import Collator, prepare_data
from qtarget.training import train
from test_train_support import config, tiny, tokenizer, toy_rows

ARGS = {"profit": {"tau": 0.0}, "psft": {"eps": 0.2}, "prob_masked": {"q": 0.0}, "nll_masked": {"q": 0.0},
        "prift_mass": {"tau": 0.0}}
EXTRA = {"psft": {"psft_updates_per_batch": 2}}


def mean_nll(model, examples, pad_id: int) -> float:
    batch = Collator(pad_id)(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    y = batch["labels"][:, 1:]
    mask = y != -100
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return float((nll * mask).sum() / mask.sum())


def teacher_kl(student, teacher, examples, pad_id: int) -> float:
    batch = Collator(pad_id)(examples)
    with torch.no_grad():
        s = torch.log_softmax(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        t = torch.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    mask = (batch["labels"][:, 1:] != -100)
    kl = (t.exp() * (t - s)).sum(-1)[:, :-1]
    return float((kl * mask).sum() / mask.sum())


@pytest.mark.parametrize("objective", list_objectives())
def test_every_objective_trains_a_tiny_model(tmp_path, objective):
    tok = tokenizer()
    rows = toy_rows(8)
    if objective == "token_weighted":
        rows = [{**r, "token_weights": 1.0} for r in rows]
    data = prepare_data(rows, tok, max_length=64)
    model, teacher = tiny(), tiny(seed=3)
    toward_teacher = objective in ("kd", "target_sft")  # gamma ~ 0 (kd) or p_y ~ 1e-5 at random init
    if toward_teacher:
        with torch.no_grad():
            teacher.lm_head.weight.mul_(30.0)  # a peaked teacher, far from the near-uniform student
    before = mean_nll(model, data.train.examples, tok.pad_token_id)
    kl_before = teacher_kl(model, teacher, data.train.examples, tok.pad_token_id)
    cfg = config(tmp_path, objective=objective, objective_args=ARGS.get(objective, {}), max_steps=8,
                 learning_rate=3e-2, **EXTRA.get(objective, {}))
    result = train(cfg, model=model, tokenizer=tok, train_dataset=data.train, teacher=teacher, save_final=False)
    assert len(result.history) == 8 and all(r["loss"] == r["loss"] for r in result.history)  # finite
    if toward_teacher:  # the target is (mostly) the teacher's distribution, not the label
        assert teacher_kl(model, teacher, data.train.examples, tok.pad_token_id) < 0.8 * kl_before
    else:
        assert mean_nll(model, data.train.examples, tok.pad_token_id) < before - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dft", "target_sft", "prift_prob"])  # prift_prob: a frozen reference copy
def test_smollm2_short_fine_tune(tmp_path, objective):
    from qtarget.models import load_smollm2

    model, tok = load_smollm2()
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a, b in [(2, 3), (7, 5), (11, 4), (9, 9), (13, 6), (8, 1), (20, 22), (6, 15)]]
    data = prepare_data(rows, tok, max_length=64)
    before = mean_nll(model, data.train.examples, tok.pad_token_id)
    teacher = model if objective == "target_sft" else None  # a frozen copy is made below
    if teacher is not None:
        import copy

        teacher = copy.deepcopy(model)
    cfg = config(tmp_path, objective=objective, max_steps=4, learning_rate=1e-4, per_device_train_batch_size=4,
                 max_length=64, **({"psft_updates_per_batch": 2} if objective == "psft" else {}))
    result = train(cfg, model=model, tokenizer=tok, train_dataset=data.train, teacher=teacher, save_final=False)
    after = mean_nll(model, data.train.examples, tok.pad_token_id)
    assert after < before, (before, after)
    assert result.history[-1]["p_y"] > result.history[0]["p_y"]
