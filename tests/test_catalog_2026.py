"""The catalogue of 2026 beyond what the registry-wide tests check (test_objectives / test_fused /
test_properties parametrise over objective_formulas.CATALOGUE_PARAMS, which holds these names too):
both sides of the thresholded Beyond-log losses, PriFT's cumulative mass against a sort-based
computation, the named objectives against their composed-target readings, DEFT's concentration, and
bad parameters named."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qtarget
from objective_formulas import expected_loss, expected_target, flat_supervised, make_case
from qtarget.objectives.rules import mass_at_or_below_label

NEW = ("prob_masked", "nll_masked", "prift_prob", "prift_mass", "deft")


@pytest.mark.parametrize("name", ["prob_masked", "nll_masked"])
@pytest.mark.parametrize("side", ["above", "below"])
@pytest.mark.parametrize("q", [0.0, 0.02, 0.5, 1.0])
def test_thresholded_beyond_log_both_sides(name, side, q):
    params = {"q": q, "side": side}
    z, y, aux = make_case((4, 6, 1000), seed=13)
    zz = z.clone().requires_grad_(True)
    res = qtarget.token_loss(qtarget.get_objective(name, **params), zz, y, reduction="sum")
    res.loss.backward()
    zf, yf, auxf = flat_supervised(z, y, aux)
    m = y != -100
    # a token exactly at the threshold (two logits spiked to +50: p_y = 0.5 in exact arithmetic) is kept or
    # dropped by the last bit of float32 rounding, which differs between CPUs: compare every other token
    # (q = 0 and q = 1 are the ends every probability rounds consistently to, tested as they are)
    py = torch.softmax(zf, -1).gather(-1, yf.unsqueeze(-1)).squeeze(-1)
    off = ((py - q).abs() > 1e-6) | (q in (0.0, 1.0))
    assert off.sum() >= m.sum() - 2  # the two tied tokens of this case, no more
    torch.testing.assert_close(res.per_token[m].double()[off], expected_loss(name, params, zf, yf, auxf)[off],
                               rtol=1e-4, atol=1e-5)
    Q, _ = expected_target(name, params, zf, yf, auxf)
    torch.testing.assert_close(zz.grad[m].double()[off], (torch.softmax(zf, -1) - Q)[off], rtol=1e-4, atol=1e-6)


def test_thresholds_at_the_extremes():
    """q = 0 above keeps every token: nll_masked = SFT, prob_masked = prob(alpha=1) = 1 - p_y; q = 1
    below keeps every token too; above with q = 1 keeps only the tokens with p_y = 1 (loss 0)."""
    z, y, _ = make_case((3, 5, 1000), seed=2)
    for a, b in [(("nll_masked", {"q": 0.0}), ("sft", {})), (("nll_masked", {"q": 1.0, "side": "below"}), ("sft", {})),
                 (("prob_masked", {"q": 0.0}), ("prob", {"alpha": 1.0}))]:
        got = qtarget.token_loss(qtarget.get_objective(a[0], **a[1]), z, y).loss
        torch.testing.assert_close(got, qtarget.token_loss(qtarget.get_objective(b[0], **b[1]), z, y).loss)
    top = qtarget.token_loss(qtarget.get_objective("nll_masked", q=1.0), z, y)
    m = y != -100
    certain = torch.softmax(z[m], -1).gather(-1, y[m].unsqueeze(-1)) == 1.0  # logits at +-50 saturate
    assert float(top.loss) == 0.0 and top.metrics["gamma"] == pytest.approx(float(certain.float().mean()))


def test_nll_masked_above_is_profit():
    """ProFit's code keeps p_y >= tau, as Beyond-log's OnlyTopLogP keeps p >= q: the same objective."""
    z, y, _ = make_case((5, 7, 1000), seed=4)
    for tau in (0.01, 0.1, 0.4):
        a = qtarget.token_loss(qtarget.get_objective("profit", tau=tau), z, y, reduction="sum")
        b = qtarget.token_loss(qtarget.get_objective("nll_masked", q=tau), z, y, reduction="sum")
        torch.testing.assert_close(a.per_token, b.per_token, rtol=0, atol=0)


def test_profit_keeps_a_label_exactly_at_the_threshold():
    z = torch.zeros(1, 10)  # uniform
    y = torch.tensor([3])
    tau = float(torch.log_softmax(z, -1)[0, 3].exp())  # p_y as the loss computes it, exactly
    res = qtarget.token_loss(qtarget.get_objective("profit", tau=tau), z, y)
    assert res.metrics["gamma"] == 1.0 and float(res.loss) == pytest.approx(torch.log(torch.tensor(10.0)).item())


def _mass_by_sorting(logits, labels):
    """u_t from the cumulative distribution sorted ascending: the cumsum at the label's sorted position
    (every token ranked below the label, then the label)."""
    q = torch.softmax(logits.double(), -1)
    out = []
    for row, y in zip(q, labels):
        order = torch.argsort(row, stable=True)
        cdf = torch.cumsum(row[order], 0)
        rank = int((order == y).nonzero())
        ties_after = int(((row == row[y]) & (torch.arange(len(row)) != y)).sum())
        assert ties_after == 0  # random logits: no ties with the label
        out.append(cdf[rank])
    return torch.stack(out)


def test_prift_mass_score_matches_a_sorted_cdf():
    z, y, aux = make_case((40, 1000), seed=6)
    y = y.clamp_min(0)
    u = mass_at_or_below_label(torch.log_softmax(aux["ref_logits"].float(), -1), y)
    torch.testing.assert_close(u.double(), _mass_by_sorting(aux["ref_logits"], y), rtol=0, atol=1e-5)
    assert bool((u > 0).all()) and bool((u <= 1 + 1e-6).all())


@pytest.mark.parametrize("named,composed", [
    (("prift_prob", {}), dict(gamma="p_y", gamma_from="reference")),
    (("prift_mass", {"tau": 0.6}), dict(gamma="mass", tau=0.6, gamma_from="reference")),
    (("nll_masked", {"q": 0.05}), dict(gamma="threshold", tau=0.05)),  # equal up to ties p_y == q
])
def test_named_objectives_have_the_gradient_of_their_composed_target(named, composed):
    """A weighted NLL -sg(w) log p_y and CE(w delta_y + (1 - w) sg(p), p) differ in value, not gradient."""
    z, y, aux = make_case((3, 7, 1000), seed=8)
    grads = []
    for obj in (qtarget.get_objective(named[0], **named[1]), qtarget.target(**composed)):
        assert obj.needs == qtarget.get_objective(named[0], **named[1]).needs
        zz = z.clone().requires_grad_(True)
        qtarget.token_loss(obj, zz, y, reduction="sum", **aux).loss.backward()
        grads.append(zz.grad)
    # (1 - w) (p - sg(p)) of the composed form rounds to ~1e-7 where w = 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_prift_weights_do_not_move_with_the_student():
    """The PriFT weight comes from the reference only: changing the student's logits changes the loss
    (through log p_y) but not gamma."""
    z, y, aux = make_case((3, 6, 1000), seed=9)
    for name in ("prift_prob", "prift_mass"):
        a = qtarget.token_loss(name, z, y, **aux)
        b = qtarget.token_loss(name, 3.0 * z, y, **aux)
        assert a.metrics["gamma"] == pytest.approx(b.metrics["gamma"], rel=1e-6)
        assert a.metrics["kl_ref"] != pytest.approx(b.metrics["kl_ref"])


def test_deft_concentration_and_limits():
    z, y, _ = make_case((4, 5, 1000), seed=10)
    res = qtarget.token_loss("deft", z, y)
    m = y != -100
    p = torch.softmax(z[m].double(), -1)
    assert res.metrics["concentration"] == pytest.approx(float((p * p).sum(-1).mean()), rel=1e-5)
    # a one-hot-like prediction (a -> 1) gives DEFT ~ 1 - p_y (Beyond-log's -p); a flat one (a -> 1/V)
    # gives ~ -log p_y (NLL), the paper's interpolation
    peaked = torch.full((1, 50), -30.0)
    peaked[0, 0] = 30.0
    label = torch.tensor([0])
    flat = torch.zeros(1, 50)
    assert float(qtarget.token_loss("deft", peaked, label).loss) == pytest.approx(0.0, abs=1e-6)
    flat_loss = float(qtarget.token_loss("deft", flat, label).loss)
    a = 1 / 50
    assert flat_loss == pytest.approx((1 - (1 / 50) ** a) / (a + 1e-6), rel=1e-5)
    assert flat_loss == pytest.approx(float(torch.log(torch.tensor(50.0))), rel=0.05)


@pytest.mark.parametrize("name,params,match", [
    ("prob_masked", {"side": "middle"}, r"`side` must be one of above, below"),
    ("nll_masked", {"q": 1.5}, r"`q` must be in \[0.0, 1.0\]"),
    ("prift_mass", {"tau": -0.1}, r"`tau` must be in \[0.0, 1.0\]"),
    ("deft", {"alpha": 1.0}, r"objective 'deft' got unknown parameter\(s\) \['alpha'\]"),
    ("prift_prob", {"tau": 0.5}, r"objective 'prift_prob' got unknown parameter"),
])
def test_bad_parameters_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        qtarget.get_objective(name, **params)


def test_prift_needs_the_reference():
    z, y, _ = make_case((2, 3, 1000), seed=1)
    for name in ("prift_prob", "prift_mass"):
        with pytest.raises(ValueError, match=r"objective '%s' needs `ref_logits`" % name):
            qtarget.token_loss(name, z, y)


def test_new_names_are_listed_and_inspectable():
    from qtarget.inspect_cmd import inspect_objectives

    assert set(NEW) <= set(qtarget.list_objectives())
    rows = inspect_objectives(list(NEW), {}, vocab=12)["rows"]
    for row in rows:
        Q = torch.tensor(row["Q"])
        assert float(Q.sum()) == pytest.approx(1.0, abs=1e-5) and float(Q.min()) >= -1e-6
        assert F.one_hot(torch.tensor(0), 12).shape == Q.shape


def test_inspect_cli_takes_the_new_parameters(tmp_path, capsys):
    from qtarget.cli import main
    from qtarget.inspect_cmd import example_position

    out = tmp_path / "q.json"
    argv = ["inspect", "target", "prift_mass", "prob_masked", "--gamma", "power", "--alpha", "0.5", "--gamma_from",
            "reference", "--gamma_min", "0.2", "--tau", "0.3", "--q", "0.05", "--side", "below", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "prift_mass(tau=0.3)" in text and "prob_masked(q=0.05, side='below')" in text
    import json

    rows = json.loads(out.read_text())["rows"]
    z, y, aux = example_position(12, 0, None)
    wants = [qtarget.target(gamma="power", alpha=0.5, gamma_from="reference", gamma_min=0.2),
             qtarget.get_objective("prift_mass", tau=0.3), qtarget.get_objective("prob_masked", q=0.05, side="below")]
    for row, obj in zip(rows, wants):
        torch.testing.assert_close(torch.tensor(row["Q"]), qtarget.implied_target(obj, z, y, **aux)[0])
    # a rule parameter reaches `target` only when its rules read it; the whole catalogue still runs
    assert main(["inspect", "--alpha", "0.5", "--q", "0.2"]) == 0
    assert main(["inspect", "prob_masked", "--side", "middle"]) == 2
    assert "`side` must be one of above, below" in capsys.readouterr().err
