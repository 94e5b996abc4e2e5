"""The lab's rows for the literature's fixes of DFT's low-prior failure are plain `target` objectives:
dft_floor's implied target uses gamma = max(p_y, 0.2) of the online model, prift's gamma = p_y of the frozen
reference (the base model), each against a float64 formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qtarget
from objective_formulas import flat_supervised, make_case
from qtarget.lab.settings import OBJECTIVES, settings_for


def _rows():
    return {name: (objective, args) for name, objective, args in settings_for("default").runs()}


@pytest.mark.parametrize("row,source,floor", [("dft_floor", "model", 0.2), ("prift", "reference", 0.0)])
def test_fix_rows_imply_their_gamma(row, source, floor):
    objective, args = _rows()[row]
    assert objective == "target" and row in OBJECTIVES
    obj = qtarget.get_objective(objective, **args)
    assert ("ref" in obj.needs) == (source == "reference")
    z, y, aux = make_case((3, 5, 500), seed=11)
    zf, yf, auxf = flat_supervised(z, y, aux)
    p = torch.softmax(zf, -1)
    src = p if source == "model" else torch.softmax(auxf["ref_logits"].double(), -1)
    gamma = src.gather(-1, yf.unsqueeze(-1)).squeeze(-1).clamp_min(floor)
    Q = gamma.unsqueeze(-1) * F.one_hot(yf, zf.shape[-1]).double() + (1 - gamma).unsqueeze(-1) * p
    m = y != -100
    torch.testing.assert_close(qtarget.implied_target(obj, z, y, **aux)[m].double(), Q, rtol=1e-4, atol=1e-5)
    res = qtarget.token_loss(obj, z, y, reduction="sum", **aux)
    assert res.metrics["gamma"] == pytest.approx(float(gamma.mean()), rel=1e-4)
