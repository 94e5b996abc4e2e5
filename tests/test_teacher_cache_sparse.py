"""The sparse teacher (ops/sparse_teacher.py): the tail options against independent float64
formulas, the dense <-> sparse round trip, and the input checks (errors name field and position)."""
from __future__ import annotations

import math

import pytest
import torch

from qtarget.ops.sparse_teacher import TAILS, TeacherTopK, check_teacher_topk, dense_teacher_logprobs, topk_from_logits

V = 40


def problem(n=6, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.5
    student = torch.randn(n, V, generator=g, dtype=torch.float64) * 1.5
    return teacher, student, k


def reference_dense(teacher: torch.Tensor, student: torch.Tensor, k: int, tail: str) -> torch.Tensor:
    """pi_T' in float64, row by row, straight from the definitions (probability space)."""
    pi = torch.softmax(teacher, -1)
    p = torch.softmax(student, -1)
    out = torch.zeros_like(pi)
    for i in range(pi.shape[0]):
        S = set(torch.argsort(pi[i], descending=True)[:k].tolist())
        in_s = torch.tensor([v in S for v in range(V)])
        t = 1.0 - float(pi[i][in_s].sum())
        if tail == "renormalize":
            out[i][in_s] = pi[i][in_s] / pi[i][in_s].sum()
        elif tail == "student":
            out[i][in_s] = pi[i][in_s]
            out[i][~in_s] = t * p[i][~in_s] / p[i][~in_s].sum()
        else:
            out[i][in_s] = pi[i][in_s]
            out[i][~in_s] = t / (V - k)
    return out


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [1, 7, V - 1])
def test_tail_options_match_float64_formulas(tail, k):
    teacher, student, _ = problem(seed=k)
    topk = topk_from_logits(teacher.float(), k)
    got = dense_teacher_logprobs(topk.ids, topk.logprobs, topk.log_tail, student.float(), tail)
    assert got.dtype == torch.float32 and got.shape == (teacher.shape[0], V)
    want = reference_dense(teacher, student, k, tail)
    assert torch.allclose(got.double().exp(), want, atol=1e-6, rtol=1e-5)
    assert torch.allclose(got.double().exp().sum(-1), torch.ones(teacher.shape[0], dtype=torch.float64), atol=1e-6)
    if tail == "renormalize":
        assert bool(torch.isinf(got).sum(-1).eq(V - k).all())  # exactly the non-top-k are -inf
    else:
        assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("tail", TAILS)
def test_k_equal_v_is_the_dense_teacher(tail):
    teacher, student, _ = problem(seed=3)
    topk = topk_from_logits(teacher.float(), V)
    assert bool(torch.isneginf(topk.log_tail).all())
    got = dense_teacher_logprobs(topk.ids, topk.logprobs, topk.log_tail, student.float(), tail)
    assert torch.allclose(got.double(), torch.log_softmax(teacher, -1), atol=1e-5)


def test_student_tail_is_stable_when_the_top_k_hold_almost_all_mass():
    teacher = torch.zeros(2, V, dtype=torch.float64)
    teacher[:, :3] = 30.0  # tail mass ~ 1e-12
    student = torch.randn(2, V, dtype=torch.float64)
    topk = topk_from_logits(teacher.float(), 3)
    got = dense_teacher_logprobs(topk.ids, topk.logprobs, topk.log_tail, student.float(), "student")
    want = reference_dense(teacher, student, 3, "student")
    assert bool(torch.isfinite(got).all())
    assert torch.allclose(got.double()[:, 3:], want[:, 3:].log(), atol=1e-3)  # log of ~1e-14 values, no cancellation


def test_topk_from_logits_temperature_and_tail():
    teacher, _, _ = problem(seed=4)
    topk = topk_from_logits(teacher.float(), 5, temperature=2.0)
    logq = torch.log_softmax(teacher / 2.0, -1)
    top = logq.topk(5, -1)
    assert torch.equal(topk.ids, top.indices)
    assert torch.allclose(topk.logprobs.double(), top.values, atol=1e-5)
    assert torch.allclose(topk.log_tail.double(), torch.log1p(-top.values.exp().sum(-1)), atol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        topk_from_logits(teacher, V + 1)
    with pytest.raises(ValueError, match="temperature"):
        topk_from_logits(teacher, 3, temperature=0.0)


def valid(shape=(2, 3), k=4):
    teacher = torch.randn(*shape, V)
    return topk_from_logits(teacher, k)


@pytest.mark.parametrize("edit, match", [
    (lambda t: TeacherTopK(t.ids[..., :-1], t.logprobs, t.log_tail), "`logprobs` has shape"),
    (lambda t: TeacherTopK(t.ids, t.logprobs, t.log_tail[:1]), "`log_tail` has shape"),
    (lambda t: TeacherTopK(t.ids[:1], t.logprobs[:1], t.log_tail[:1]), "`ids` has shape"),
    (lambda t: TeacherTopK(t.ids.float(), t.logprobs, t.log_tail), "`ids` must be an integer"),
])
def test_check_names_the_bad_shape_or_dtype(edit, match):
    with pytest.raises(ValueError, match=match):
        check_teacher_topk(edit(valid()), (2, 3), V, tail="student")


def test_check_names_field_and_position():
    t = valid()
    ids = t.ids.clone()
    ids[1, 2, 0] = V + 5
    with pytest.raises(ValueError, match=rf"`ids` holds {V + 5} at position \(1, 2\)"):
        check_teacher_topk(TeacherTopK(ids, t.logprobs, t.log_tail), (2, 3), V, tail="student")
    ids = t.ids.clone()
    ids[0, 1, 1] = ids[0, 1, 0]
    with pytest.raises(ValueError, match=r"repeats a token id at position \(0, 1\)"):
        check_teacher_topk(TeacherTopK(ids, t.logprobs, t.log_tail), (2, 3), V, tail="student")
    lp = t.logprobs.clone()
    lp[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"`logprobs` is NaN.* at position \(1, 0\)"):
        check_teacher_topk(TeacherTopK(t.ids, lp, t.log_tail), (2, 3), V, tail="student")
    tail = t.log_tail.clone()
    tail[0, 2] = math.log(0.9)  # the mass no longer sums to 1
    with pytest.raises(ValueError, match=r"position \(0, 2\).*expected 1"):
        check_teacher_topk(TeacherTopK(t.ids, t.logprobs, tail), (2, 3), V, tail="student")
    with pytest.raises(ValueError, match="unknown teacher tail"):
        check_teacher_topk(t, (2, 3), V, tail="nope")


def test_mask_skips_filler_positions_but_not_shapes():
    t = valid()
    ids = t.ids.clone()
    ids[0, 0] = 0  # duplicates at an unsupervised position
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    check_teacher_topk(TeacherTopK(ids, t.logprobs, t.log_tail), (2, 3), V, tail="student", mask=mask)
    mask[0, 0] = True
    with pytest.raises(ValueError, match=r"position \(0, 0\)"):
        check_teacher_topk(TeacherTopK(ids, t.logprobs, t.log_tail), (2, 3), V, tail="student", mask=mask)
