"""The 'patch' layer: `qtarget.patch` on a Hugging Face causal LM needs transformers alone (the 'patch'
extra, floor 5.6.0, what LLaMA-Factory 0.9.5 runs: constraints-floors-patch.txt, scripts/test_floors.sh stage
"patch", where this file runs with no accelerate, datasets, peft or tokenizer packages of qtarget's own).

A tiny Llama built from its config (no tokenizer, no hub): the patched forward's loss and every parameter's
gradient equal the unpatched model's logits through `token_loss` (the full-logits path) and the float64
formulas of tests/objective_formulas.py, for objectives without and with a teacher / reference model; three
SGD steps of a plain loop on the patched model end at the reference's weights.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qtarget
from objective_formulas import CATALOGUE_PARAMS, expected_loss, flat_supervised

V = 97


def tiny(seed: int, tie: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[1, 8:] = -100
    return ids, labels


def reference_loss(model, name, ids, labels, teacher=None, ref=None):
    """token_loss on the unpatched model's shifted logits (aux logits from unpatched aux models)."""
    aux = {}
    with torch.no_grad():
        if teacher is not None:
            aux["teacher_logits"] = teacher(input_ids=ids).logits[:, :-1]
        if ref is not None:
            aux["ref_logits"] = ref(input_ids=ids).logits[:, :-1]
    logits = model(input_ids=ids).logits[:, :-1]
    objective = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    return qtarget.token_loss(objective, logits, labels[:, 1:], **aux).loss, logits, aux


CASES = [("sft", False), ("dft", True), ("target_sft", False), ("sft_kl", False), ("kd", True)]


@pytest.mark.parametrize("name, tie", CASES)
def test_patched_forward_equals_the_full_logits_path(name, tie):
    base, teacher = tiny(0, tie), tiny(1)
    needs = qtarget.get_objective(name).needs
    ids, labels = batch()
    ref_model = copy.deepcopy(base) if "ref" in needs else None
    want = copy.deepcopy(base)
    loss_want, logits, aux = reference_loss(want, name, ids, labels, teacher=teacher if "teacher" in needs else None,
                                            ref=ref_model)
    loss_want.backward()
    # the float64 formula on the same logits
    zf, yf, auxf = flat_supervised(logits.detach(), labels[:, 1:], aux)
    formula = expected_loss(name, CATALOGUE_PARAMS[name], zf, yf, auxf).mean()
    torch.testing.assert_close(loss_want.double(), formula, rtol=1e-5, atol=1e-6)

    model = copy.deepcopy(base)
    kwargs = {"teacher": copy.deepcopy(teacher)} if "teacher" in needs else {}
    if "ref" in needs:
        kwargs["ref"] = copy.deepcopy(base)
    qtarget.patch(model, name, chunk_size=7, **kwargs, **CATALOGUE_PARAMS[name])
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, loss_want, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for (pname, p), (_, q) in zip(model.named_parameters(), want.named_parameters()):
        assert p.grad is not None, pname
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{pname}: {m}")


def test_a_plain_loop_on_the_patched_model_trains_like_the_reference():
    base = tiny(2)
    model, want = qtarget.patch(copy.deepcopy(base), "dft"), copy.deepcopy(base)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(want.parameters(), lr=0.5)
    for step in range(3):
        ids, labels = batch(step)
        opt_a.zero_grad()
        loss_a = model(input_ids=ids, labels=labels).loss
        loss_a.backward()
        opt_a.step()
        opt_b.zero_grad()
        loss_b = reference_loss(want, "dft", ids, labels)[0]
        loss_b.backward()
        opt_b.step()
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for (pname, p), (_, q) in zip(model.named_parameters(), want.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{pname}: {m}")
