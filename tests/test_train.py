"""QTargetTrainer: global-batch normalisation, PSFT schedule, resume, auxiliary models, outputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import TrainerCallback

from qtarget import token_loss
from qtarget.data import Collator, prepare_data
from qtarget.ops.workspace import kept_workspace_bytes
from qtarget.training import train
from test_train_support import config, max_param_diff, params, tiny, tokenizer, toy_rows


def reference_sgd_step(model, examples, objective: str, lr: float) -> dict[str, torch.Tensor]:
    """One SGD step on the token mean over *all* examples, from full logits (independent of the trainer)."""
    model = copy.deepcopy(model).train()
    batch = Collator(tokenizer().pad_token_id)(list(examples))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = token_loss(objective, logits[:, :-1], batch["labels"][:, 1:]).loss
    loss.backward()
    with torch.no_grad():
        return {k: (p - lr * p.grad).detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("objective", ["sft", "dft"])
def test_gradient_accumulation_equals_full_batch_token_mean(tmp_path, objective):
    tok = tokenizer()
    data = prepare_data(toy_rows(8), tok, max_length=64)
    model = tiny()
    expected = reference_sgd_step(model, data.train.examples, objective, lr=0.5)
    # 8 rows as 4 micro-batches of 2 with different supervised-token counts, one optimizer step
    cfg = config(tmp_path, objective=objective, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                 max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0)
    train(cfg, model=model, tokenizer=tok, train_dataset=data.train, save_final=False)
    assert max_param_diff(params(model), expected) < 2e-6
    # the update is not the mean of per-micro-batch means (the test can fail)
    counts = [sum(1 for t in ex["labels"][1:] if t != -100) for ex in data.train.examples]
    assert len(set(counts)) > 1


def test_logged_loss_and_metrics_are_global_token_means(tmp_path):
    tok = tokenizer()
    data = prepare_data(toy_rows(8), tok, max_length=64)
    model = tiny()
    batch = Collator(tok.pad_token_id)(data.train.examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = token_loss("dft", logits[:, :-1], batch["labels"][:, 1:])
    cfg = config(tmp_path, objective="dft", per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=1)
    result = train(cfg, model=model, tokenizer=tok, train_dataset=data.train, save_final=False)
    row = result.history[0]
    assert row["loss"] == pytest.approx(float(ref.loss), rel=1e-5)
    for key in ("nll", "p_y", "entropy", "gamma"):
        assert row[key] == pytest.approx(ref.metrics[key], rel=1e-5), key
    assert row["tokens_per_s"] > 0


class KeptWorkspace(TrainerCallback):
    """Records the bytes of the engine's workspace kept between steps, at the end of every step."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(kept_workspace_bytes())


def test_engine_workspace_is_kept_between_steps_and_freed_after_training(tmp_path, monkeypatch):
    monkeypatch.delenv("QTARGET_KEEP_WORKSPACE", raising=False)
    tok = tokenizer()
    data = prepare_data(toy_rows(8), tok, max_length=64)
    probe = KeptWorkspace()
    train(config(tmp_path, objective="dft", per_device_train_batch_size=4, max_steps=2), model=tiny(),
          tokenizer=tok, train_dataset=data.train, save_final=False, callbacks=[probe])
    assert len(probe.seen) == 2 and all(n > 0 for n in probe.seen)  # kept for the next step (CPU)
    assert kept_workspace_bytes() == 0  # and let go when training ends


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("objective,extra", [("sft", {}), ("psft", {"psft_updates_per_batch": 3})])
def test_resume_reproduces_uninterrupted_run(tmp_path, objective, extra):
    tok = tokenizer()
    data = prepare_data(toy_rows(24), tok, max_length=64)
    kw = dict(objective=objective, max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=2,
              **extra)
    full_model = tiny()
    full = train(config(tmp_path / "full", **kw), model=full_model, tokenizer=tok, train_dataset=data.train)

    first = tiny()
    train(config(tmp_path / "cut", **kw), model=first, tokenizer=tok, train_dataset=data.train,
          callbacks=[StopAt(3)], save_final=False)
    assert (tmp_path / "cut" / "checkpoint-3" / "model.safetensors").exists()
    assert not (tmp_path / "cut" / "checkpoint-6").exists()
    resumed_model = tiny(seed=5)  # different init: everything must come from the checkpoint
    resumed = train(config(tmp_path / "cut", resume="last", **kw), model=resumed_model, tokenizer=tok,
                    train_dataset=data.train)
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]  # the checkpoint's history, then the rest
    full_losses = [r["loss"] for r in full.history]
    assert [r["loss"] for r in resumed.history] == pytest.approx(full_losses, rel=1e-5, abs=1e-7)
    assert max_param_diff(params(resumed_model), params(full_model)) < 1e-5


def test_psft_with_one_update_per_batch_is_sft(tmp_path):
    tok = tokenizer()
    data = prepare_data(toy_rows(16), tok, max_length=64)
    sft_model, psft_model = tiny(), tiny()
    train(config(tmp_path / "sft", objective="sft", max_steps=3), model=sft_model, tokenizer=tok,
          train_dataset=data.train, save_final=False)
    with pytest.warns(UserWarning, match="exactly SFT"):
        train(config(tmp_path / "psft", objective="psft", psft_updates_per_batch=1, max_steps=3), model=psft_model,
              tokenizer=tok, train_dataset=data.train, save_final=False)
    assert max_param_diff(params(sft_model), params(psft_model)) < 1e-5


def test_psft_refreshes_old_policy_per_global_batch_and_clips(tmp_path):
    tok = tokenizer()
    data = prepare_data(toy_rows(32), tok, max_length=64)
    M = 4
    cfg = config(tmp_path, objective="psft", objective_args={"eps": 0.1}, psft_updates_per_batch=M, max_steps=8,
                 per_device_train_batch_size=2, learning_rate=3e-2)
    result = train(cfg, model=tiny(), tokenizer=tok, train_dataset=data.train, save_final=False)
    hist = result.history
    assert result.trainer.psft_refreshes == 2
    assert [r["psft_refreshes"] for r in hist] == [1, 1, 1, 1, 2, 2, 2, 2]
    for r in hist:
        if (r["step"] - 1) % M == 0:  # first mini-batch after a refresh: pi_old is the current model
            assert r["ratio"] == pytest.approx(1.0, abs=1e-5)
            assert r["clip_frac"] == 0.0
        else:
            assert abs(r["ratio"] - 1.0) > 1e-4
    assert max(r["clip_frac"] for r in hist) > 0


def test_teacher_whose_head_misses_tokens_is_rejected(tmp_path):
    tok = tokenizer()
    teacher = tiny(seed=1)
    teacher.resize_token_embeddings(len(tok) - 8)  # fewer rows than the shared tokenizer has tokens
    with pytest.raises(ValueError, match=r"teacher model's LM head has \d+ rows .* heads do not cover the shared"):
        train(config(tmp_path, objective="target_sft"), model=tiny(), tokenizer=tok, train_dataset=toy_rows(8),
              teacher=teacher)


def test_objective_needing_a_teacher_errors_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match=r"needs a teacher model \(--teacher_model\)"):
        train(config(tmp_path, objective="kd", model="/nonexistent/model", dataset="/nonexistent.jsonl"))


def test_lora_reference_is_the_student_with_adapters_disabled(tmp_path):
    tok = tokenizer()
    model = tiny()
    cfg = config(tmp_path, objective="asft", use_lora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"],
                 max_steps=3, save_strategy="steps", save_steps=3, learning_rate=5e-2)
    result = train(cfg, model=model, tokenizer=tok, train_dataset=toy_rows(16))
    trainer = result.trainer
    assert trainer.use_adapter_ref and trainer.ref is None  # no second copy
    hist = result.history
    assert hist[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    assert hist[-1]["kl_ref"] > 1e-6
    assert (tmp_path / "checkpoint-3" / "adapter_model.safetensors").exists()
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    # the base weights did not move: disabling the adapter gives back the initial model
    base = tiny()
    batch = Collator(tok.pad_token_id)(prepare_data(toy_rows(4), tok).train.examples)
    peft_model = trainer.model
    with torch.no_grad(), peft_model.disable_adapter():
        got = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_run_outputs(tmp_path):
    tok = tokenizer()
    cfg = config(tmp_path, objective="dft", max_steps=4, save_strategy="steps", save_steps=2, plot=True,
                 eval_fraction=0.25, eval_strategy="steps", eval_steps=2)
    result = train(cfg, model=tiny(), tokenizer=tok, train_dataset=toy_rows(16))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"metrics.csv", "metrics.jsonl", "curves.png", "config.yaml", "checkpoint-2", "checkpoint-4",
            "final"} <= names
    assert not any(n.startswith(".qtarget-staging") for n in names)
    assert (tmp_path / "final" / "model.safetensors").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r and "eval_loss" not in r] == [1, 2, 3, 4]
    evals = [r for r in lines if "eval_loss" in r]
    assert len(evals) == 2 and all("eval_nll" in r and "eval_p_y" in r for r in evals)
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "nll" in csv_lines[0].split(",")
    assert result.data_report.rows == 16
