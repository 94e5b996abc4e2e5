"""Composable gamma options of the general target: gamma_from="reference" (the rule reads p_y / p of the
frozen reference model) and gamma_min / gamma_max (gamma = clamp(gamma, min, max)).

Each is checked against a float64 formula written here (loss and implied target, dL/dz = p - Q), the
fused engine against the full-logits path, and the reference source against a direct computation with a
separate frozen copy of the model, through the trainer (full copy and LoRA adapters-off)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import qtarget
from objective_formulas import flat_supervised, make_case
from qtarget.data import Collator, prepare_data
from qtarget.lab.sweep import parse_sweep
from qtarget.training import QTargetTrainer
from test_fused import assert_same, make_inputs, run_both
from test_train_support import config, tiny, tokenizer, toy_rows

# (gamma rule, its parameters, float64 gamma from the probabilities p [n, V] and p_y [n] of the source)
RULES = {
    "p_y": ({}, lambda p, py: py),
    "power": ({"alpha": 0.5}, lambda p, py: py ** 0.5),
    "threshold": ({"tau": 0.05}, lambda p, py: (py > 0.05).double()),
    "ratio": ({"lam": 0.2}, lambda p, py: py / (py + 0.2)),
    "topk_entropy": ({"k": 10, "alpha": 1.0}, lambda p, py: _topk_entropy(p, 10)),
}
CLAMPS = [(None, None), (0.1, None), (None, 0.6), (0.2, 0.7)]


def _topk_entropy(p, k):
    top = p.topk(k, -1).values
    top = top / top.sum(-1, keepdim=True)
    return -(top * top.log()).sum(-1) / math.log(k)


def _expected(rule, source, low, high, residual, z, y, aux):
    """(Q [n, V], per-token loss [n]) in float64 for the supervised rows."""
    p = torch.softmax(z, -1)
    src = p if source == "model" else torch.softmax(aux["ref_logits"].double(), -1)
    gamma = RULES[rule][1](src, src.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    gamma = gamma.clamp(0.0 if low is None else low, 1.0 if high is None else high)
    res = p if residual == "student" else torch.softmax(aux["ref_logits"].double(), -1)
    Q = gamma.unsqueeze(-1) * F.one_hot(y, z.shape[-1]).double() + (1 - gamma).unsqueeze(-1) * res
    return Q, -(Q * torch.log_softmax(z, -1)).sum(-1)


def _objective(rule, source, low, high, residual="student"):
    return qtarget.target(gamma=rule, residual=residual, gamma_from=source, gamma_min=low, gamma_max=high,
                          **RULES[rule][0])


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("source", ["model", "reference"])
@pytest.mark.parametrize("low,high", CLAMPS)
def test_loss_and_gradient_match_the_formula(rule, source, low, high):
    residual = "reference" if rule == "ratio" else "student"
    obj = _objective(rule, source, low, high, residual)
    assert ("ref" in obj.needs) == (source == "reference" or residual == "reference")
    z, y, aux = make_case((3, 5, 1000), seed=17)
    zz = z.clone().requires_grad_(True)
    res = qtarget.token_loss(obj, zz, y, reduction="sum", **aux)
    res.loss.backward()
    zf, yf, auxf = flat_supervised(z, y, aux)
    Q, loss = _expected(rule, source, low, high, residual, zf, yf, auxf)
    m = y != -100
    torch.testing.assert_close(res.per_token[m].double(), loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zz.grad[m].double(), torch.softmax(zf, -1) - Q, rtol=1e-4, atol=1e-5)
    Q_lib = qtarget.implied_target(obj, z, y, **aux)
    torch.testing.assert_close(Q_lib[m].double(), Q, rtol=1e-4, atol=1e-5)
    assert (low or 0.0) - 1e-6 <= res.metrics["gamma"] <= (high or 1.0) + 1e-6


def test_clamp_moves_gamma_only_outside_the_bounds():
    """A floor lifts DFT's low-prior tokens (p_y << gamma_min) and leaves the others exactly as DFT."""
    z, y, aux = make_case((4, 6, 1000), seed=3)
    m = y != -100
    p_y = torch.softmax(z.double(), -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[m]
    floored = qtarget.token_loss(qtarget.target(gamma="p_y", gamma_min=0.3), z, y, reduction="sum")
    dft = qtarget.token_loss("dft", z, y, reduction="sum")
    # DFT's value is -p_y log p_y; the composed target is CE(Q, p): gradients agree where p_y >= 0.3
    grads = []
    for obj in (qtarget.target(gamma="p_y", gamma_min=0.3), qtarget.get_objective("dft")):
        zz = z.clone().requires_grad_(True)
        qtarget.token_loss(obj, zz, y, reduction="sum").loss.backward()
        grads.append(zz.grad[m])
    keep = p_y >= 0.3
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(grads[0][keep], grads[1][keep], rtol=1e-5, atol=1e-7)
    p = torch.softmax(z[m].double(), -1)
    floor_grad = 0.3 * (p - F.one_hot(y[m], 1000).double())  # gradient = gamma_min (p - delta_y) below the floor
    torch.testing.assert_close(grads[0][~keep].double(), floor_grad[~keep], rtol=1e-4, atol=1e-6)
    assert floored.metrics["gamma"] > dft.metrics["gamma"]


def test_reference_source_with_the_reference_equal_to_the_model_is_the_model_source():
    z, y, aux = make_case((3, 4, 1000), seed=5)
    for rule in RULES:
        a = qtarget.token_loss(_objective(rule, "model", 0.1, 0.9), z, y)
        b = qtarget.token_loss(_objective(rule, "reference", 0.1, 0.9), z, y, ref_logits=z)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec,match", [
    (dict(gamma_from="teacher"), "gamma_from must be one of"),
    (dict(gamma_min=-0.1), r"gamma_min.*\[0, 1\]"),
    (dict(gamma_max=1.5), r"gamma_max.*\[0, 1\]"),
    (dict(gamma_min=0.6, gamma_max=0.4), "must not exceed"),
    (dict(gamma=0.5, gamma_from="reference"), "reads no model probabilities"),
    (dict(gamma="data_weight", gamma_from="reference"), "reads no model probabilities"),
])
def test_bad_gamma_options_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        qtarget.target(**spec)


def test_reference_source_needs_ref_logits():
    z, y, _ = make_case((2, 3, 1000), seed=1)
    with pytest.raises(ValueError, match="needs `ref_logits`"):
        qtarget.token_loss(qtarget.target(gamma="p_y", gamma_from="reference"), z, y)


FUSED = [("p_y", "reference", 0.1, None, "student"), ("power", "model", None, 0.5, "student"),
         ("topk_entropy", "reference", 0.05, 0.95, "reference"), ("threshold", "reference", None, None, "student")]


@pytest.mark.parametrize("rule,source,low,high,residual", FUSED)
@pytest.mark.parametrize("aux_as_logits", [False, True], ids=["aux_hidden", "aux_logits"])
def test_fused_equals_full_logits(rule, source, low, high, residual, aux_as_logits):
    obj = _objective(rule, source, low, high, residual)
    c = make_inputs((3, 7), seed=21)
    got, got_grads, want, want_grads = run_both(obj, c, aux_as_logits=aux_as_logits, chunk_size=5)
    assert_same(got, got_grads, want, want_grads, tol=1e-5)


def test_reachable_from_config_and_lab_sweep(tmp_path):
    cfg = config(tmp_path, objective="target",
                 objective_args="gamma=power,alpha=0.5,gamma_from=reference,gamma_min=0.1,gamma_max=0.9")
    obj = cfg.build_objective()
    assert cfg.objective_needs == frozenset({"ref"})
    z, y, aux = make_case((2, 3, 1000), seed=2)
    want = qtarget.token_loss(_objective("power", "reference", 0.1, 0.9), z, y, **aux).loss
    torch.testing.assert_close(qtarget.token_loss(obj, z, y, **aux).loss, want)
    assert parse_sweep(["target.gamma_min=0,0.2"]) == (("target", "gamma_min", (0, 0.2)),)
    assert parse_sweep(["target.gamma_from=model,reference"])[0][2] == ("model", "reference")


# ------------------------------------------------------------------ trainer path: a frozen copy by hand
def _initial():
    """The initial model: a tiny Llama with a peaked head (a random one is near-uniform, p_y ~ 1/V)."""
    model = tiny(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _lora_student():
    model = get_peft_model(_initial(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


TRAINER_CASES = {
    "target": {"gamma": "power", "alpha": 0.5, "gamma_from": "reference", "gamma_min": 0.002},
    "prift_prob": {},
    "prift_mass": {"tau": 0.3},
}


@pytest.mark.parametrize("objective", list(TRAINER_CASES))
@pytest.mark.parametrize("lora", [False, True], ids=["full_copy", "lora_adapters_off"])
def test_trainer_reference_source_equals_a_separate_frozen_copy(tmp_path, lora, objective):
    """QTargetTrainer's loss and gradients with a gamma read from the reference (gamma_from="reference",
    PriFT) equal token_loss with ref_logits from a separately built frozen copy of the initial model,
    after the student has moved away from it."""
    tok = tokenizer()
    args = TRAINER_CASES[objective]
    student = _lora_student() if lora else _initial()
    trainer = QTargetTrainer(model=student, processing_class=tok,
                             args=config(tmp_path, objective=objective, objective_args=args))
    assert trainer.use_adapter_ref == lora
    if not lora:  # move the student away from the frozen copy the trainer took at construction
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    frozen = _initial().eval()  # the initial model, built again: independent of the trainer's copy
    batch = Collator(tok.pad_token_id)(prepare_data(toy_rows(4), tok, max_length=64).train.examples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"][:, 1:]
    n = int(labels.ne(-100).sum())
    model = trainer.model.train()

    model.zero_grad(set_to_none=True)
    got = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    got.backward()
    got_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref_logits = frozen(**inputs).logits[:, :-1]
    logits = model(**inputs).logits[:, :-1]  # without labels the patched forward returns plain logits
    want = qtarget.token_loss(qtarget.get_objective(objective, **args), logits, labels, normalizer=float(n),
                              ref_logits=ref_logits)
    want.loss.backward()
    assert float(got.detach()) == pytest.approx(float(want.loss), rel=1e-5)
    scale = max(float(g.abs().max()) for g in got_grads.values())
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got_grads[k], p.grad, rtol=1e-4, atol=1e-5 * scale)  # fused closed form vs autograd
    # and the reference really differs from the student: gamma read from the student differs
    student_as_ref = qtarget.token_loss(qtarget.get_objective(objective, **args), logits.detach(), labels,
                                        normalizer=float(n), ref_logits=logits.detach())
    assert student_as_ref.metrics["gamma"] != pytest.approx(want.metrics["gamma"], rel=1e-2)

