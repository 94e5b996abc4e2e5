"""Reductions, and micro-batches accumulated with `normalizer` equal to the full batch."""
from __future__ import annotations

import pytest
import torch

import qtarget
from objective_formulas import CATALOGUE_PARAMS, make_case


def _per_token_loss(name, z, y, aux):
    return qtarget.token_loss(qtarget.get_objective(name, **CATALOGUE_PARAMS[name]), z, y, reduction="sum",
                              **aux).per_token.detach()


@pytest.mark.parametrize("name", ["sft", "dft", "psft", "target_sft"])
def test_reductions_against_manual(name):
    z, y, aux = make_case((4, 9, 1000), seed=12)
    y[2] = -100  # one sequence fully ignored
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    per = _per_token_loss(name, z, y, aux)
    m = y != -100
    for reduction, want in [
        ("sum", per.sum()),
        ("mean", per.sum() / m.sum()),
        ("sequence_mean", torch.stack([per[b][m[b]].mean() for b in range(4) if m[b].any()]).mean()),
    ]:
        got = qtarget.token_loss(obj, z, y, reduction=reduction, **aux).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=reduction)
    got = qtarget.token_loss(obj, z, y, normalizer=123.0, **aux).loss
    torch.testing.assert_close(got, per.sum() / 123.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sft", "label_smoothing", "asft", "psft", "kd"])
def test_microbatches_with_normalizer_equal_full_batch(name):
    """Gradient accumulation: sum over micro-batches of loss(normalizer = global token count) has the
    loss and gradient of the full batch's token mean, however unevenly tokens fall in micro-batches."""
    z, y, aux = make_case((6, 11, 1000), seed=13)
    y[0, :9] = -100  # uneven supervised counts per micro-batch
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    full_z = z.clone().requires_grad_(True)
    full = qtarget.token_loss(obj, full_z, y, **aux).loss
    full.backward()
    total = int((y != -100).sum())
    acc_z = z.clone().requires_grad_(True)
    acc_loss = 0.0
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part = {k: v[sl] for k, v in aux.items()}
        loss = qtarget.token_loss(obj, acc_z[sl], y[sl], normalizer=total, **part).loss
        loss.backward()
        acc_loss = acc_loss + loss.detach()
    torch.testing.assert_close(acc_loss, full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc_z.grad, full_z.grad, rtol=1e-5, atol=1e-8)


def test_sequence_mean_needs_batch_dimension():
    z, y, _ = make_case((5, 1000), seed=0)
    with pytest.raises(ValueError, match="sequence_mean"):
        qtarget.token_loss("sft", z, y, reduction="sequence_mean")


def test_unknown_reduction():
    z, y, _ = make_case((5, 1000), seed=0)
    with pytest.raises(ValueError, match="unknown reduction 'avg'.*mean, sum, sequence_mean"):
        qtarget.token_loss("sft", z, y, reduction="avg")
