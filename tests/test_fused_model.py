"""The fused engine inside a real (tiny) causal LM: every parameter's gradient equals the one from the
model's own full logits, with tied embeddings and with a frozen head under LoRA."""
from __future__ import annotations

import pytest
import torch

import qtarget
from qtarget.models import tiny_causal_lm

V = 300


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    return ids, labels


def grads_two_ways(model, objective, **kw):
    ids, labels = batch()
    out = {}
    for path in ("fused", "reference"):
        model.zero_grad(set_to_none=True)
        if path == "fused":
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            loss = qtarget.fused_token_loss(objective, hidden, model.lm_head.weight, labels[:, 1:], chunk_size=5,
                                            **kw).loss
        else:
            logits = model(input_ids=ids).logits[:, :-1]
            loss = qtarget.token_loss(objective, logits, labels[:, 1:], **kw).loss
        loss.backward()
        out[path] = (float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None})
    return out["fused"], out["reference"]


def assert_grads_equal(fused, reference, tol=1e-5):
    # gem's loss (-log p_y - CE(q, p), ~-0.016 here) is a small difference of terms of size ~log V:
    # float32 rounding of those terms (~6e-8 * 6 per token) bounds its absolute error, not its relative one
    assert fused[0] == pytest.approx(reference[0], rel=tol, abs=1e-6)
    assert fused[1].keys() == reference[1].keys() and fused[1]
    for name, want in reference[1].items():
        err = float((fused[1][name] - want).abs().max() / want.abs().max().clamp_min(1e-30))
        assert err <= tol, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("objective", ["sft", "dft", "gem"])
def test_model_gradients_match_full_logits(tied, objective):
    model = tiny_causal_lm(V, hidden_size=32, num_layers=2, tie_word_embeddings=tied).train()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert_grads_equal(*grads_two_ways(model, objective))


def test_lora_with_frozen_head():
    peft = pytest.importorskip("peft")
    model = tiny_causal_lm(V, hidden_size=32, num_layers=2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    base = model.get_base_model()
    assert not base.lm_head.weight.requires_grad
    fused, reference = grads_two_ways(base, "prob")
    assert all("lora" in n for n in fused[1]) and len(fused[1]) == 8
    assert_grads_equal(fused, reference)
