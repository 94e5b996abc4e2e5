"""gift, sed_sft and talr beyond the registry-wide tests (test_objectives / test_fused / test_properties
parametrise over objective_formulas.CATALOGUE_PARAMS, which holds them too): GIFT's Q-form and its
composed `target` row, its reference path through the fused engine, SED-SFT's selection and scale,
TALR against its composed reading, the lab's rows, and bad parameters named."""
from __future__ import annotations

import math

import pytest
import torch

import qtarget
import qtarget.lab.cli as lab_cli
from qtarget.cli import main
from objective_formulas import make_case
from qtarget.ops import fused_token_loss


def _soft_case(seed, n=40, V=500):
    """Logits with no probability near GIFT's 1e-10 floor (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g), torch.randint(0, V, (n,), generator=g), torch.randn(n, V, generator=g)


@pytest.mark.parametrize("beta", [0.0, 1.5, 20.0])
def test_gift_target_is_the_reference_with_the_label_raised(beta):
    """Q = softmax(log pi_ref + beta 1[v = y]) = gamma delta_y + (1 - gamma) pi_ref with
    gamma = (e^beta - 1) pi_ref(y) / (1 + (e^beta - 1) pi_ref(y)), the registered metric."""
    z, y, ref = _soft_case(1)
    Q, c = qtarget.implied_target(qtarget.get_objective("gift", beta=beta), z, y, return_scale=True, ref_logits=ref)
    raised = torch.log_softmax(ref.double(), -1)
    raised[torch.arange(len(y)), y] += beta
    torch.testing.assert_close(Q.double(), torch.softmax(raised, -1), rtol=1e-4, atol=1e-6)
    assert bool((c == 1).all())
    pr_y = torch.softmax(ref.double(), -1)[torch.arange(len(y)), y]
    gamma = math.expm1(beta) * pr_y / (1 + math.expm1(beta) * pr_y)
    res = qtarget.token_loss(qtarget.get_objective("gift", beta=beta), z, y, ref_logits=ref)
    assert res.metrics["gamma"] == pytest.approx(float(gamma.mean()), rel=1e-5, abs=1e-7)


def test_gift_is_the_composed_gibbs_target_away_from_the_floor():
    """target(gamma="gibbs", gain=beta, gamma_from="reference", residual="reference") builds GIFT's Q; the
    two differ only through the code's 1e-10 floor, invisible where pi_ref has no tiny entries."""
    z, y, ref = _soft_case(2)
    a = qtarget.implied_target(qtarget.get_objective("gift", beta=7.0), z, y, ref_logits=ref)
    composed = qtarget.target(gamma="gibbs", gain=7.0, gamma_from="reference", residual="reference")
    assert composed.needs == frozenset({"ref"})
    torch.testing.assert_close(qtarget.implied_target(composed, z, y, ref_logits=ref), a, rtol=1e-4, atol=1e-6)
    la = qtarget.token_loss(qtarget.get_objective("gift", beta=7.0), z, y, ref_logits=ref).loss
    torch.testing.assert_close(qtarget.token_loss(composed, z, y, ref_logits=ref).loss, la, rtol=1e-5, atol=1e-6)


def test_gift_floor_follows_the_code_where_the_reference_gives_the_label_nothing():
    """pi_ref(y) = 0 (a -inf reference logit): the code's log(p + 1e-10) still raises the label, to
    gamma = (e^beta - 1) 1e-10 / (1 + (e^beta - 1) 1e-10) of the normalised floor."""
    z = torch.zeros(1, 10)
    ref = torch.zeros(1, 10)
    ref[0, 3] = -math.inf
    y = torch.tensor([3])
    Q = qtarget.implied_target(qtarget.get_objective("gift", beta=20.0), z, y, ref_logits=ref)
    floor = 1e-10 / (1 + 10 * 1e-10)
    gamma = math.expm1(20.0) * floor / (1 + math.expm1(20.0) * floor)
    assert float(Q[0, 3]) == pytest.approx(gamma + (1 - gamma) * floor, rel=1e-4)


def test_gift_without_gain_and_fully_smoothed_is_uniform_label_smoothing():
    z, y, ref = _soft_case(3)
    a = qtarget.token_loss(qtarget.get_objective("gift", beta=0.0, smooth=1.0), z, y, ref_logits=ref, reduction="sum")
    b = qtarget.token_loss(qtarget.get_objective("label_smoothing", lam=1.0), z, y, reduction="sum")
    torch.testing.assert_close(a.per_token, b.per_token, rtol=1e-5, atol=1e-5)


def test_gift_reference_path_through_the_fused_engine():
    """The reference given as hidden states + its own head (formed chunk by chunk) = given as logits."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 5, 24, generator=g, requires_grad=True)
    head = torch.randn(700, 24, generator=g) * 0.3
    ref_hidden, ref_head = torch.randn(3, 5, 24, generator=g), torch.randn(700, 24, generator=g) * 0.3
    labels = torch.randint(0, 700, (3, 5), generator=g)
    labels[1, :2] = -100
    obj = qtarget.get_objective("gift", beta=20.0, smooth=0.1)
    fused = fused_token_loss(obj, hidden, head, labels, ref_hidden=ref_hidden, ref_head=ref_head, chunk_size=4)
    (g_fused,) = torch.autograd.grad(fused.loss, hidden)
    full = qtarget.token_loss(obj, hidden @ head.T, labels, ref_logits=ref_hidden @ ref_head.T)
    (g_full,) = torch.autograd.grad(full.loss, hidden)
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused, g_full, rtol=1e-5, atol=1e-6)
    assert fused.metrics["gamma"] == pytest.approx(full.metrics["gamma"], rel=1e-5)


def test_sed_sft_selects_by_top_k_mass_and_scales_the_nll_gradient():
    z, y, aux = make_case((50, 1000), seed=5)
    y = y.clamp_min(0)
    obj = qtarget.get_objective("sed_sft", scale=1.0, k=2, tau=0.8)
    p = torch.softmax(z.double(), -1)
    top2 = torch.sort(p, -1, descending=True).values[:, :2].sum(-1)
    selected = top2 < 0.8
    assert 0 < int(selected.sum()) < len(y)  # both kinds of token in the case
    res = qtarget.token_loss(obj, z, y)
    assert res.metrics["selected"] == pytest.approx(float(selected.double().mean()))
    # Q = delta_y with c = 1 - s m p_y (2 p_y - 1) in [0, 9/8]: the gradient is NLL's, rescaled per token
    Q, c = qtarget.implied_target(obj, z, y, return_scale=True)
    torch.testing.assert_close(Q, torch.nn.functional.one_hot(y, 1000).float(), rtol=0, atol=1e-4)
    py = p[torch.arange(len(y)), y]
    torch.testing.assert_close(c.double(), 1 - selected.double() * py * (2 * py - 1), rtol=1e-5, atol=1e-6)
    assert bool((c >= 0).all()) and bool((c <= 9 / 8 + 1e-6).all())
    off = qtarget.token_loss(qtarget.get_objective("sed_sft", scale=0.0), z, y, reduction="sum")
    torch.testing.assert_close(off.per_token, qtarget.token_loss("sft", z, y, reduction="sum").per_token)


def test_talr_is_the_composed_power_target_with_a_floor():
    """w = max(p_y^(1/tau), floor) = target(gamma="power", alpha=1/tau, gamma_min=floor) in gradient
    (p_y >= 1e-6, where the port's clamp does not act)."""
    z, y, _ = _soft_case(6, V=300)
    for tau, floor in ((1.0, 0.0), (2.5, 0.05), (0.5, 0.2)):
        grads = []
        for obj in (qtarget.get_objective("talr", tau=tau, floor=floor),
                    qtarget.target(gamma="power", alpha=1 / tau, gamma_min=floor)):
            zz = z.clone().requires_grad_(True)
            qtarget.token_loss(obj, zz, y, reduction="sum").loss.backward()
            grads.append(zz.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    res = qtarget.token_loss(qtarget.get_objective("talr", tau=1.0, floor=0.0), z, y)
    assert res.metrics["gamma"] == pytest.approx(res.metrics["p_y"], rel=1e-5)  # tau = 1: DFT's weight


def test_lab_accepts_the_new_objectives_as_rows(monkeypatch, tmp_path):
    """`qtarget lab --objectives gift,sed_sft,talr` parses into rows that train those objectives (the run
    itself is stubbed: this checks how the lab reads the rows)."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_run_lab(settings, output_dir, **kwargs):
        seen["settings"] = settings
        raise Stop

    monkeypatch.setattr(lab_cli, "run_lab", fake_run_lab)
    with pytest.raises(Stop):
        lab_cli.main(["--tiny", "--objectives", "gift,sed_sft,talr", "--objective_args", "gift.beta=10",
                      "--output_dir", str(tmp_path)])
    runs = seen["settings"].runs()
    assert [(row, obj) for row, obj, _ in runs] == [("gift", "gift"), ("sed_sft", "sed_sft"), ("talr", "talr")]
    assert dict(runs[0][2]) == {"beta": 10.0}
    assert qtarget.get_objective("gift", **runs[0][2]).needs == frozenset({"ref"})


@pytest.mark.parametrize("name,params,match", [
    ("gift", {"beta": -1.0}, r"objective 'gift': parameter `beta` must be a finite number >= 0"),
    ("gift", {"smooth": 1.5}, r"`smooth` must be in \[0.0, 1.0\]"),
    ("sed_sft", {"scale": 2.0}, r"`scale` must be in \[0.0, 1.0\]"),
    ("sed_sft", {"k": 0}, r"`k` must be >= 1"),
    ("talr", {"tau": 0.0}, r"`tau` must be a finite number > 0"),
    ("talr", {"floor": -0.1}, r"`floor` must be in \[0.0, 1.0\]"),
])
def test_bad_parameters_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        qtarget.get_objective(name, **params)


def test_gibbs_rule_parameter_is_checked_and_gift_needs_the_reference():
    with pytest.raises(ValueError, match=r"gamma rule 'gibbs': `gain` must be a finite number >= 0"):
        qtarget.target(gamma="gibbs", gain=-2)
    z, y, _ = _soft_case(7)
    with pytest.raises(ValueError, match=r"objective 'gift' needs `ref_logits`"):
        qtarget.token_loss("gift", z, y)


def test_inspect_takes_the_new_parameters(capsys):
    argv = ["inspect", "gift", "sed_sft", "talr", "target", "--beta", "5", "--smooth", "0.1", "--scale", "0.5",
            "--floor", "0.05", "--gamma", "gibbs", "--gain", "5", "--gamma_from", "reference", "--residual", "reference"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for shown in ("gift(beta=5.0, smooth=0.1)", "sed_sft(scale=0.5, k=2, tau=0.95)", "talr(tau=1.0, floor=0.05)",
                  "gibbs(gain=5.0)@reference"):
        assert shown in text
