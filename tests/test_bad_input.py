"""Bad input raises ValueError naming what is wrong; degenerate input never produces NaN."""
from __future__ import annotations

import pytest
import torch

import qtarget
from objective_formulas import CATALOGUE_PARAMS, make_case


def test_label_out_of_range_names_the_value():
    z, y, _ = make_case((2, 4, 1000), seed=0)
    y[1, 2] = 1000
    with pytest.raises(ValueError, match=r"labels contain 1000 at position \(1, 2\).*\[0, 1000\)"):
        qtarget.token_loss("sft", z, y)
    y[1, 2] = -7
    with pytest.raises(ValueError, match="labels contain -7"):
        qtarget.token_loss("sft", z, y)


def test_custom_ignore_index_is_respected():
    z, y, _ = make_case((2, 4, 1000), seed=0)
    y[y == -100] = -1
    res = qtarget.token_loss("sft", z, y, ignore_index=-1)
    assert res.metrics["n_tokens"] == int((y != -1).sum())


def test_shape_mismatch_names_both_shapes():
    z, y, _ = make_case((2, 4, 1000), seed=0)
    with pytest.raises(ValueError, match=r"\(2, 4, 1000\).*\(2, 3\)"):
        qtarget.token_loss("sft", z, y[:, :3])


@pytest.mark.parametrize("name,arg", [("target_sft", "teacher_logits"), ("kd", "teacher_logits"),
                                      ("distill_hybrid", "teacher_logits"), ("sft_kl", "ref_logits"),
                                      ("asft", "ref_logits"), ("psft", "old_logprobs"),
                                      ("token_weighted", "token_weights")])
def test_missing_auxiliary_input_names_the_argument(name, arg):
    z, y, _ = make_case((2, 4, 1000), seed=0)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        qtarget.token_loss(name, z, y)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        qtarget.implied_target(name, z, y)


def test_teacher_vocabulary_mismatch():
    z, y, aux = make_case((2, 4, 1000), seed=0)
    with pytest.raises(ValueError, match="vocabulary size 999 but the student has 1000"):
        qtarget.token_loss("target_sft", z, y, teacher_logits=aux["teacher_logits"][..., :999])
    with pytest.raises(ValueError, match="ref_logits"):
        qtarget.token_loss("asft", z, y, ref_logits=aux["ref_logits"][..., :999])


def test_aux_shape_mismatch():
    z, y, aux = make_case((2, 4, 1000), seed=0)
    with pytest.raises(ValueError, match="old_logprobs"):
        qtarget.token_loss("psft", z, y, old_logprobs=aux["old_logprobs"][:, :3])


@pytest.mark.parametrize("name", list(CATALOGUE_PARAMS))
def test_every_position_ignored_gives_zero_loss_and_zero_gradient(name):
    z, y, aux = make_case((2, 4, 1000), seed=0)
    y = torch.full_like(y, -100)
    z = z.requires_grad_(True)
    for reduction in ("mean", "sum", "sequence_mean"):
        res = qtarget.token_loss(qtarget.get_objective(name, **CATALOGUE_PARAMS[name]), z, y,
                                 reduction=reduction, **aux)
        assert float(res.loss.detach()) == 0.0 and torch.isfinite(res.loss)
        res.loss.backward()
        assert z.grad is not None and torch.all(z.grad == 0)
        assert all(v == v for v in res.metrics.values())  # no NaN metrics


def test_non_finite_logits_are_rejected_unless_check_disabled():
    z, y, _ = make_case((2, 4, 1000), seed=0)
    z[0, 1, 5] = float("nan")
    with pytest.raises(ValueError, match="logits.*NaN or inf"):
        qtarget.token_loss("sft", z, y)
    z[0, 1, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        qtarget.token_loss("sft", z, y)
    qtarget.token_loss("sft", z, y, check_finite=False)  # the switch turns the check off


def test_unknown_objective_and_parameter_list_valid_ones():
    with pytest.raises(ValueError, match="unknown objective 'dtf'.*did you mean dft.*valid objectives: sft"):
        qtarget.get_objective("dtf")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['lamda'\].*valid parameters: \['lam'\]"):
        qtarget.get_objective("asft", lamda=0.1)
    with pytest.raises(ValueError, match="eta"):
        qtarget.get_objective("target_sft", eta=1.5)
    with pytest.raises(ValueError, match="unknown gamma rule 'sometimes'"):
        qtarget.target(gamma="sometimes")
    with pytest.raises(ValueError, match=r"\['eta'\] are not used"):
        qtarget.target(gamma="p_y", residual="uniform", eta=0.5)


def test_integer_logits_labels_dtype_checked():
    z, y, _ = make_case((2, 4, 1000), seed=0)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        qtarget.token_loss("sft", z, y.float())
