"""The boundaries of real checkpoints, on tiny models built with the same properties: LM heads padded
to different row counts over one tokenizer, heads with a bias (Phi), softcap (Gemma-2) and logit
scale (Granite) on an auxiliary model only, LoRA on the LM head (both PEFT forms). Every case compares
the patched model's fused loss (and gradients) with the reference path on the models' own full logits."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

from qtarget import get_objective, implied_target, patch, target, token_loss
from qtarget.training import QTargetConfig, QTargetTrainer
from qtarget.training.patch import unpatch

H, SHARED = 32, 900


class SharedTokenizer:
    """Stands for the one tokenizer two checkpoints share (only its length matters here)."""

    def __init__(self, n: int = SHARED) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def llama(vocab: int, seed: int, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, **kw)
    return LlamaForCausalLM(cfg).float()


def sharpen_head(model, factor: float = 20.0):
    """Large logits, so that softcap / scale / bias make a visible difference."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def batch(seed: int = 0, B: int = 3, T: int = 9, vocab: int = SHARED):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[0, -2:] = -100
    return ids, labels


def own_logits(model, ids) -> torch.Tensor:
    """The model's own full logits (its original forward)."""
    return model(input_ids=ids).logits.float()


def reference_loss(objective, student, ids, labels, **aux_logits):
    logits = own_logits(student, ids)[:, :-1]
    return token_loss(objective, logits, labels[:, 1:], **{k: v[:, :-1] for k, v in aux_logits.items()})


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        scale = max(float(b[k].abs().max()), 1e-12)
        assert float((a[k] - b[k]).abs().max()) / scale <= tol, k


# ------------------------------------------------------------------------------ padded vocabularies
@pytest.mark.parametrize("student_rows, teacher_rows", [(1000, 1024), (1024, 1000)])
def test_padded_heads_over_one_tokenizer_use_the_common_rows(student_rows, teacher_rows):
    student, teacher = llama(student_rows, 0), sharpen_head(llama(teacher_rows, 1), 3.0)
    ids, labels = batch()
    obj = get_objective("target_sft", eta=0.5)
    t_logits = own_logits(teacher, ids)
    if teacher_rows >= student_rows:  # pi_T renormalised over the student's V
        t_logits = t_logits[..., :student_rows]
    else:  # rows the teacher lacks get probability 0
        pad = t_logits.new_full(t_logits.shape[:-1] + (student_rows - teacher_rows,), float("-inf"))
        t_logits = torch.cat([t_logits, pad], -1)
    want = reference_loss(obj, student, ids, labels, teacher_logits=t_logits)
    want.loss.backward()
    want_grads = grads(student)
    student.zero_grad()

    with pytest.raises(ValueError, match=rf"teacher model's LM head has {teacher_rows} rows but the student's has "
                                         rf"{student_rows}: pass the tokenizer both share"):
        patch(copy.deepcopy(student), obj, teacher=teacher)
    patch(student, obj, teacher=teacher, tokenizer=SharedTokenizer())
    got = student(input_ids=ids, labels=labels)
    got.loss.backward()
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5)
    assert got.metrics["kl_teacher"] == pytest.approx(want.metrics["kl_teacher"], rel=1e-4)
    assert_close_grads(grads(student), want_grads, 1e-5)


def test_padded_heads_trained_by_the_trainer(tmp_path):
    from test_train_support import toy_rows, tokenizer

    tok = tokenizer()
    student = llama(len(tok) + 7, 0, pad_token_id=tok.pad_token_id)
    teacher = llama(len(tok) + 71, 1, pad_token_id=tok.pad_token_id)
    from qtarget.training import train

    cfg = QTargetConfig(output_dir=str(tmp_path), objective="target_sft", max_steps=2, use_cpu=True,
                        report_to="none", save_strategy="no", per_device_train_batch_size=4, max_length=64,
                        plot=False, disable_tqdm=True)
    result = train(cfg, model=student, tokenizer=tok, train_dataset=toy_rows(8), teacher=teacher, save_final=False)
    assert result.global_step == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert all(r["kl_teacher"] > 0 for r in result.history)


# ----------------------------------------------------------------------- a head with a bias (Phi)
def phi(seed: int) -> PhiForCausalLM:
    torch.manual_seed(seed)
    cfg = PhiConfig(vocab_size=1000, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=64)
    model = PhiForCausalLM(cfg).float()
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 2.0)
    return sharpen_head(model, 5.0)


def test_head_with_bias_frozen_copy_is_at_kl_zero():
    student = phi(0)
    assert student.lm_head.bias is not None
    ids, labels = batch()
    patch(student, "asft", lam=0.1, ref=copy.deepcopy(student))
    out = student(input_ids=ids, labels=labels)
    assert out.metrics["kl_ref"] <= 1e-6
    # and the loss is the reference path's with the model's own (biased) logits
    logits = own_logits(student, ids)[:, :-1]
    want = token_loss(get_objective("asft", lam=0.1), logits, labels[:, 1:], ref_logits=logits)
    assert float(out.loss) == pytest.approx(float(want.loss), rel=1e-5)


def test_teacher_equal_to_student_gives_residual_p():
    student = phi(0)
    ids, labels = batch(1)
    patch(student, "target_sft", eta=0.7, teacher=copy.deepcopy(student))
    out = student(input_ids=ids, labels=labels)
    assert out.metrics["kl_teacher"] <= 1e-6
    # pi_tilde = p  =>  Q = p_y delta_y + (1 - p_y) p: the same loss as DFT's implied target CE
    logits = own_logits(student, ids)[:, :-1].detach()
    Q = implied_target("target_sft", logits, labels[:, 1:], teacher_logits=logits)
    p = torch.softmax(logits, -1)
    mask = labels[:, 1:] != -100
    p_y = p.gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    expected_Q = p_y.unsqueeze(-1) * torch.nn.functional.one_hot(labels[:, 1:].clamp_min(0), 1000) + \
        (1 - p_y).unsqueeze(-1) * p
    assert torch.allclose(Q[mask], expected_Q[mask], atol=1e-6)


# --------------------------------------------------- softcap and logit scale on the aux model only
def gemma2_teacher(seed: int = 2) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=1000, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=8, final_logit_softcapping=2.0,
                       max_position_embeddings=64, tie_word_embeddings=False)
    return sharpen_head(Gemma2ForCausalLM(cfg).float(), 40.0)


def granite_ref(seed: int = 3) -> GraniteForCausalLM:
    torch.manual_seed(seed)
    cfg = GraniteConfig(vocab_size=1000, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, logits_scaling=4.0, max_position_embeddings=64)
    return sharpen_head(GraniteForCausalLM(cfg).float(), 40.0)


def test_softcap_and_scale_belong_to_the_aux_model():
    ids, labels = batch(2)
    teacher, ref = gemma2_teacher(), granite_ref()
    t_logits, r_logits = own_logits(teacher, ids), own_logits(ref, ids)
    assert float(t_logits.abs().max()) <= 2.0  # the teacher's own softcap acts
    obj = target(gamma="p_y", residual="geometric_mix", eta=0.6)
    for name, kwargs, aux in (("teacher", {"teacher_logits": t_logits}, {"teacher": teacher}),
                              ("ref", {"ref_logits": r_logits}, {"ref": ref})):
        student = llama(1000, 0)
        objective = obj if name == "teacher" else get_objective("asft", lam=0.2)
        want = reference_loss(objective, student, ids, labels, **kwargs)
        want.loss.backward()
        want_grads = grads(student)
        student.zero_grad()
        patch(student, objective, **aux)
        got = student(input_ids=ids, labels=labels)
        got.loss.backward()
        assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5)
        assert_close_grads(grads(student), want_grads, 1e-5)
        # the test can fail: the aux logits without their own transform give another loss
        raw = {k: v for k, v in kwargs.items()}
        key = next(iter(raw))
        plain = (teacher if name == "teacher" else ref).get_output_embeddings().weight
        hidden = (teacher if name == "teacher" else ref).model(input_ids=ids).last_hidden_state
        raw[key] = (hidden @ plain.T).detach()
        other = reference_loss(objective, student, ids, labels, **raw)
        assert abs(float(other.loss) - float(want.loss)) > 1e-3


# ------------------------------------------------------------------------------ LoRA on the LM head
@pytest.mark.parametrize("form", ["target_modules", "modules_to_save"])
def test_lora_on_the_lm_head_is_used_and_trained(form):
    torch.manual_seed(0)
    base = llama(1000, 0)
    if form == "target_modules":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # move the adapters off their zero init so the head differs from the base
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    ids, labels = batch(3)
    logits = model(input_ids=ids).logits.float()
    base_head_logits = model.get_base_model().model(input_ids=ids).last_hidden_state @ \
        model.get_base_model().lm_head.original_module.weight.T if form == "modules_to_save" else None
    want = token_loss("dft", logits[:, :-1], labels[:, 1:])
    want.loss.backward()
    want_grads = grads(model)
    model.zero_grad()
    head_grads = [k for k in want_grads if "lm_head" in k]
    assert head_grads, "the head's adapter must get a gradient"
    patch(model, "dft")
    got = model(input_ids=ids, labels=labels)
    got.loss.backward()
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5)
    assert_close_grads(grads(model), want_grads, 1e-5)
    if base_head_logits is not None:  # the trained copy, not the original head, is used
        assert not torch.allclose(base_head_logits, logits, atol=1e-3)


def test_lora_dropout_on_the_head_is_refused_in_training():
    model = get_peft_model(llama(1000, 0), LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1))
    patch(model, "sft")
    model.train()
    ids, labels = batch()
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        model(input_ids=ids, labels=labels)


# -------------------------------------------------------------------------- smaller defects
def test_kd_convention_no_t_squared_and_kl_teacher_at_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 50, (6,), generator=g)
    T = 2.5
    zz = z.clone().requires_grad_(True)
    res = token_loss(get_objective("kd", temperature=T), zz, y, teacher_logits=t, reduction="sum")
    res.loss.backward()
    pi_T = torch.softmax(t / T, -1)
    assert torch.allclose(zz.grad, torch.softmax(z, -1) - pi_T, atol=1e-6)  # unit scale: no T^2
    kl = (pi_T * (torch.log(pi_T) - torch.log_softmax(z, -1))).sum(-1).mean()
    assert res.metrics["kl_teacher"] == pytest.approx(float(kl), rel=1e-5)
    kl_at_1 = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(z, -1))).sum(-1).mean()
    assert abs(float(kl_at_1) - float(kl)) > 1e-2  # the test can fail


def test_target_sft_with_eta_zero_needs_no_teacher_and_is_dft(tmp_path):
    obj = get_objective("target_sft", eta=0.0)
    assert obj.needs == frozenset()
    a, b = llama(1000, 0), llama(1000, 0)
    ids, labels = batch(4)
    patch(a, obj)
    a(input_ids=ids, labels=labels).loss.backward()
    patch(b, "dft")
    b(input_ids=ids, labels=labels).loss.backward()
    assert_close_grads(grads(a), grads(b), 1e-4)
    QTargetConfig(output_dir=str(tmp_path), objective="target_sft", objective_args={"eta": 0.0})  # no teacher needed


def test_old_residual_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="residual rule 'old' is not available: a pi_old residual"):
        target(gamma="p_y", residual="old")


def test_psft_eval_loss_is_the_nll(tmp_path):
    from test_train_support import config, tiny, tokenizer, toy_rows

    from qtarget.data import Collator, prepare_data

    tok = tokenizer()
    data = prepare_data(toy_rows(8), tok, max_length=64)
    model = tiny()
    trainer = QTargetTrainer(model=model, args=config(tmp_path, objective="psft", psft_updates_per_batch=2),
                             train_dataset=data.train, eval_dataset=data.train, processing_class=tok)
    metrics = trainer.evaluate()
    unpatch(model)
    batch_ = Collator(tok.pad_token_id)(list(data.train.examples))
    with torch.no_grad():
        logits = model(input_ids=batch_["input_ids"], attention_mask=batch_["attention_mask"]).logits
    nll = token_loss("sft", logits[:, :-1], batch_["labels"][:, 1:]).loss
    assert metrics["eval_loss"] == pytest.approx(float(nll), rel=1e-4)
    assert metrics["eval_loss"] > 1.0  # not PSFT's constant -1
