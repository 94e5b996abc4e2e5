"""The drop-in (`qtarget.patch`) inside other trainers: an unchanged TRL `SFTTrainer` (its own collator,
completion-only loss, with and without packing), HF `Trainer` and a plain loop get the fused objective.

For dft, asft (LoRA student; reference = the student with adapters off) and target_sft (teacher model),
the loss and gradients of `SFTTrainer.compute_loss` on one of its own batches equal QTargetTrainer's on
the same batch, and both equal the full-logits reference `qtarget.token_loss` (logits from the
unpatched models, gradients by autograd through them).
"""
from __future__ import annotations

import warnings

import datasets
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

import qtarget
from qtarget.data import Collator
from qtarget.training import QTargetTrainer
from qtarget.training.patch import patched_state
from test_train_support import config, tiny, tokenizer

trl = pytest.importorskip("trl")

OBJECTIVES = {"dft": {}, "asft": {"lam": 0.3}, "target_sft": {"eta": 0.5}}
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"Q{i}: what is {i} plus {i % 3}?", "completion": f" It is {i + i % 3}, I think."}
            for i in range(n)]


def student(objective: str):
    """A tiny Llama; for asft a LoRA student (attention; TRL refuses LoRA on lm_head) with random B, so
    adapters-off differs."""
    model = tiny(seed=0).train()
    if objective != "asft":
        return model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():  # lora_A's init draws from the global RNG: set both
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def teacher_for(objective: str):
    return tiny(seed=1) if objective == "target_sft" else None


def sft_trainer(tmp_path, model, *, packing: bool, **overrides):
    args = dict(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
                max_length=64, packing=packing, completion_only_loss=True, seed=0)
    args.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.SFTTrainer(model=model, args=trl.SFTConfig(**args), processing_class=tokenizer(),
                              train_dataset=datasets.Dataset.from_list(rows()))


def loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def reference(objective: str, batch: dict, n: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Full logits of the unpatched models (same extra inputs TRL's batch carries, e.g. packed-sequence
    boundaries) -> qtarget.token_loss / n, gradients by autograd."""
    model, teacher = student(objective), teacher_for(objective)
    # use_cache=False as in training: with a cache, transformers does not detect packed sequences
    inputs = {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}
    labels = batch["labels"][:, 1:]
    aux = {}
    if teacher is not None:
        with torch.no_grad():
            aux["teacher_logits"] = teacher(**inputs).logits[:, :-1]
    if objective == "asft":
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            aux["ref_logits"] = model(**inputs).logits[:, :-1]
        model.train()
    obj = qtarget.get_objective(objective, **OBJECTIVES[objective])

    def compute():
        logits = model(**inputs).logits[:, :-1]
        return qtarget.token_loss(obj, logits, labels, normalizer=float(n), **aux).loss

    return loss_and_grads(model, compute)


def assert_close(a: tuple[float, dict], b: tuple[float, dict], what: str) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-7), what
    assert a[1].keys() == b[1].keys(), what
    scale = max(float(g.abs().max()) for g in b[1].values())
    assert scale > 0, what
    # atol 1e-5 of the largest gradient: float32 sums taken in another order (a tied embedding's gradient
    # adds the head's and the input's parts) move a 2e-6 entry by 6e-10 (seen with transformers 5.25)
    for k in a[1]:
        assert torch.allclose(a[1][k], b[1][k], rtol=1e-4, atol=1e-5 * scale), (what, k,
                                                                               float((a[1][k] - b[1][k]).abs().max()))


@pytest.mark.parametrize("packing", [False, True], ids=["collator", "packing"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_sft_trainer_drop_in_equals_qtarget_trainer(tmp_path, objective, packing):
    trainer = sft_trainer(tmp_path, student(objective), packing=packing)
    assert qtarget.patch(trainer, objective, teacher=teacher_for(objective), **OBJECTIVES[objective]) is trainer
    state = patched_state(trainer.model)
    assert state.ref_from_adapters == (objective == "asft")  # LoRA reference = adapters off, no copy
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = batch["labels"]
    assert (labels[:, :3] == -100).all()  # completion-only: the prompt is masked
    if packing:
        assert labels.shape[0] == 1 and "position_ids" in batch and "attention_mask" not in batch
    n = int(labels[:, 1:].ne(-100).sum())
    trainer.model.train()
    trl_side = loss_and_grads(trainer.model, lambda: trainer.compute_loss(trainer.model, dict(batch),
                                                                          num_items_in_batch=n))

    qt = QTargetTrainer(model=student(objective), teacher=teacher_for(objective), processing_class=tokenizer(),
                        args=config(tmp_path / "qt", objective=objective, objective_args=OBJECTIVES[objective]))
    qt.model.train()
    qt_batch = {k: batch[k] for k in (*MODEL_KEYS, "labels") if k in batch}
    qt_side = loss_and_grads(qt.model, lambda: qt.compute_loss(qt.model, qt_batch, num_items_in_batch=n))
    full = reference(objective, batch, n)
    assert_close(trl_side, full, f"SFTTrainer drop-in vs full logits ({objective})")
    assert_close(trl_side, qt_side, f"SFTTrainer drop-in vs QTargetTrainer ({objective})")


def test_sft_trainer_trains_with_the_drop_in(tmp_path):
    """trainer.train() runs through TRL's own loop and metrics; the logged loss is the objective's."""
    trainer = sft_trainer(tmp_path, student("target_sft"), packing=False, max_steps=2)
    qtarget.patch(trainer, "target_sft", teacher=teacher_for("target_sft"), eta=0.5)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n = int(batch["labels"][:, 1:].ne(-100).sum())
    full_first = reference("target_sft", batch, n)[0]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert logs[0]["loss"] == pytest.approx(full_first, rel=1e-4)  # the first step's batch, before any update
    assert 0.0 <= logs[0]["mean_token_accuracy"] <= 1.0 and logs[0]["entropy"] > 0
    assert max(float((p.detach() - before[k]).abs().max()) for k, p in trainer.model.named_parameters()) > 1e-4


def test_hf_trainer_and_plain_loop(tmp_path):
    """HF Trainer (num_items_in_batch from its own count) and a plain loop with the patched model."""
    tok = tokenizer()
    collate = Collator(tok.pad_token_id)
    enc = [tok(r["prompt"] + r["completion"]) for r in rows(4)]
    feats = []
    for r, e in zip(rows(4), enc):
        prompt_len = len(tok(r["prompt"])["input_ids"])
        ids = e["input_ids"]
        feats.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    batch = collate(feats)
    n = int(batch["labels"][:, 1:].ne(-100).sum())
    full = reference("target_sft", batch, n)

    model = qtarget.patch(tiny(seed=0).train(), "target_sft", teacher=teacher_for("target_sft"), eta=0.5)
    inputs = {k: batch[k] for k in (*MODEL_KEYS, "labels") if k in batch}
    loop = loss_and_grads(model, lambda: model(**inputs, num_items_in_batch=n).loss)
    assert_close(loop, full, "plain loop")
    out = model(**inputs, num_items_in_batch=n)
    assert out.per_token_loss.shape == (batch["labels"].shape[0], batch["labels"].shape[1] - 1)
    assert float(out.per_token_loss.sum()) / n == pytest.approx(float(out.loss.detach()), rel=1e-5)
    assert {"nll", "kl_teacher"} <= set(out.metrics)

    hf_model = tiny(seed=0).train()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to="none",
                                          per_device_train_batch_size=4, disable_tqdm=True, save_strategy="no")
    hf = transformers.Trainer(model=hf_model, args=args, data_collator=collate)
    qtarget.patch(hf, "target_sft", teacher=teacher_for("target_sft"), eta=0.5)
    counted = int(hf._get_num_items_in_batch([inputs], torch.device("cpu")))
    assert counted == n  # HF counts the shifted labels, as qtarget normalises
    hf_side = loss_and_grads(hf.model, lambda: hf.compute_loss(hf.model, dict(inputs), num_items_in_batch=counted))
    assert_close(hf_side, full, "HF Trainer")


def test_patch_refuses_trainer_settings_that_bypass_it(tmp_path):
    with pytest.raises(ValueError, match="loss_type='dft'.*loss_type='nll'"):
        qtarget.patch(sft_trainer(tmp_path, tiny(), packing=False, loss_type="dft"), "dft")
    with pytest.raises(ValueError, match="psft.*QTargetTrainer"):
        qtarget.patch(sft_trainer(tmp_path, tiny(), packing=False), "psft")
    with pytest.raises(ValueError, match="compute_loss_func"):
        trainer = sft_trainer(tmp_path, tiny(), packing=False)
        trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum()
        qtarget.patch(trainer, "dft")
    with pytest.raises(ValueError, match="target_sft.*needs a teacher"):
        qtarget.patch(sft_trainer(tmp_path, tiny(), packing=False), "target_sft")


def test_patch_before_building_sft_trainer_trains_the_objective(tmp_path):
    """SFTTrainer wraps the forward of the model it is given with its own fused NLL head in __init__; a model
    patched before that still trains the patched objective (TRL's fused_lm_head call is routed to it): the
    loss and gradients of compute_loss, and the first logged loss of train(), are dft's, not NLL's."""
    early = qtarget.patch(tiny(seed=0).train(), "dft")
    trainer = sft_trainer(tmp_path, early, packing=False)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n = int(batch["labels"][:, 1:].ne(-100).sum())
    trainer.model.train()
    got = loss_and_grads(trainer.model, lambda: trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n))
    want = reference("dft", batch, n)
    assert_close(got, want, "patch, then SFTTrainer")
    assert abs(got[0] - reference_nll(batch, n)) > 1e-3 * abs(got[0])  # not TRL's NLL (the test can fail)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(want[0], rel=1e-4)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_patch_before_a_peft_sft_trainer_trains_the_objective(tmp_path, task_type):
    """With peft_config, SFTTrainer wraps the patched model in PEFT, then adds its fused head: the first
    step still trains dft (LoRA's B starts at 0, so that step's loss is the base model's dft loss), or, with
    PEFT releases whose PeftModelForCausalLM calls the wrapped forward without module hooks (0.15), the
    first step raises the bypass error; it never trains NLL."""
    early = qtarget.patch(tiny(seed=0).train(), "dft")
    args = sft_trainer(tmp_path, tiny(), packing=False, max_steps=1).args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=early, args=args, processing_class=tokenizer(),
                                 train_dataset=datasets.Dataset.from_list(rows()),
                                 peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        task_type=task_type))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n = int(batch["labels"][:, 1:].ne(-100).sum())
    try:
        trainer.train()
    except RuntimeError as e:  # a PEFT release whose forward skips module hooks: refused, never silent
        assert "qtarget.patch(LlamaForCausalLM, 'dft') was bypassed" in str(e)
        assert "qtarget.patch(trainer, 'dft', ...)" in str(e)
        return
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(reference("dft", batch, n)[0], rel=1e-4)


def test_a_forward_replaced_after_patching_is_refused_in_training(tmp_path):
    """Any forward installed over the patched one (e.g. Liger's) that runs the decoder itself: a training
    forward raises; evaluation-style calls (no gradient) still run."""
    import types

    model = qtarget.patch(tiny(seed=0), "dft")
    model.forward = types.MethodType(lambda self, **kw: type(self).forward(self, **kw), model)
    batch = Collator(tokenizer().pad_token_id)([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}])
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"]).logits.shape[-1] == len(tokenizer())
    model.train()
    with pytest.raises(RuntimeError, match="was bypassed"):
        model(input_ids=batch["input_ids"], labels=batch["labels"])
    qtarget.training.patch.unpatch(model)
    model(input_ids=batch["input_ids"], labels=batch["labels"])  # unpatched: the guard is gone


def reference_nll(batch: dict, n: int) -> float:
    model = tiny(seed=0)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1]
    return float(qtarget.token_loss("sft", logits, batch["labels"][:, 1:], normalizer=float(n)).loss)


def test_patch_copies_no_state_between_trainers(tmp_path):
    """Patching one SFTTrainer's model leaves another model alone (state lives on the patched module)."""
    a, b = sft_trainer(tmp_path, tiny(), packing=False), sft_trainer(tmp_path, tiny(), packing=False)
    qtarget.patch(a, "dft")
    assert patched_state(a.model) is not None and patched_state(b.model) is None
