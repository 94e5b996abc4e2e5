"""qtarget's loss in verl's engine SFT trainer (qtarget.integrations.verl).

The first part runs everywhere (torch only): the loss on a fake verl micro-batch (jagged log-probs, an
unshifted loss_mask, batch_num_tokens, dp_size) against float64 formulas of each objective written here.
The second part (marker `verl`) runs only when the verl venv of scripts/setup_verl.sh exists
($QTARGET_VERL_VENV, default /tmp/qtarget-verl): it drives the loss through verl's own engine code
(FSDPEngineWithLMHead.forward_backward_batch -> forward_step -> prepare_model_outputs -> loss) on CPU in
that venv's python (tests/test_integration_verl_driver.py) and compares it with verl's stock sft_loss and
the DFT fork's formula.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtarget.integrations.label_logprob import NeedsDistributionError, check_label_only, label_terms
from qtarget.integrations.verl import VerlLoss, verl_loss
from qtarget.objectives import get_objective

ROOT = Path(__file__).resolve().parents[1]
VERL_VENV = Path(os.environ.get("QTARGET_VERL_VENV", "/tmp/qtarget-verl"))
VERL_PYTHON = VERL_VENV / "bin" / "python"


def fake_batch(seed: int, lengths=(5, 7, 4), dp_size: int = 1, batch_num_tokens: int | None = None):
    """A verl no-padding micro-batch: per-sequence log-probs (log p(token t+1)) as float64 lists, a loss
    mask per input token (the prompt's first token never supervised), old log-probs, token weights."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for L in lengths:
        logp = torch.log(torch.rand(L, generator=g, dtype=torch.float64) * 0.98 + 0.01)
        prompt = int(torch.randint(1, L - 1, (1,), generator=g))
        mask = [0] * prompt + [1] * (L - prompt)
        old = logp + 0.6 * torch.randn(L, generator=g, dtype=torch.float64)
        weights = torch.rand(L, generator=g, dtype=torch.float64) * 2
        seqs.append({"logp": logp, "mask": mask, "old": old, "weights": weights})
    n_sup = sum(sum(s["mask"]) for s in seqs)
    return seqs, dp_size, (n_sup if batch_num_tokens is None else batch_num_tokens)


def as_verl(seqs, dp_size, batch_num_tokens, dtype=torch.float32):
    """(model_output, data, leaf) in verl's layout: nested jagged tensors over the packed tokens."""
    offsets = torch.tensor([0] + [len(s["mask"]) for s in seqs]).cumsum(0)
    leaf = torch.cat([s["logp"] for s in seqs]).to(dtype).requires_grad_()
    jag = lambda v: torch.nested.nested_tensor_from_jagged(v, offsets)  # noqa: E731
    data = {"loss_mask": jag(torch.tensor(sum((s["mask"] for s in seqs), []))),
            "old_log_probs": jag(torch.cat([s["old"] for s in seqs]).to(dtype)),
            "token_weights": jag(torch.cat([s["weights"] for s in seqs]).to(dtype)),
            "dp_size": dp_size, "batch_num_tokens": batch_num_tokens}
    return {"log_probs": jag(leaf)}, data, leaf


def per_token_reference(name: str, lp: float, old: float, w: float, params: dict) -> float:
    """Each objective's per-token loss from its paper, in float64, from log p(y) = lp."""
    p = math.exp(lp)
    if name == "sft":
        return -lp
    if name == "dft":
        return -p * lp  # DFT fork: CE * sg(p_y)
    if name == "prob":
        a = params.get("alpha", 1.0)
        return (1 - p ** a) / a
    if name == "profit":
        return -lp if p >= params.get("tau", 0.1) else 0.0
    if name == "psft":
        r = math.exp(lp - old)
        return -min(r, 1 + params.get("eps", 0.28))  # -min(r, clip(r, 1-eps, 1+eps)), advantage 1
    if name == "token_weighted":
        return -w * lp
    raise AssertionError(name)


def reference_loss(name, seqs, dp_size, batch_num_tokens, params):
    """sum over supervised predictions / batch_num_tokens * dp_size; log_probs[t] predicts token t+1, so it
    counts where loss_mask[t+1] == 1."""
    total = 0.0
    for s in seqs:
        for t in range(len(s["mask"]) - 1):
            if s["mask"][t + 1]:
                total += per_token_reference(name, float(s["logp"][t]), float(s["old"][t]),
                                             float(s["weights"][t + 1]), params)
    return total / batch_num_tokens * dp_size


CASES = [("sft", {}), ("dft", {}), ("prob", {}), ("prob", {"alpha": 0.5}), ("profit", {"tau": 0.3}),
         ("psft", {"eps": 0.2}), ("token_weighted", {})]


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_equal_float64_formulas(name, params, seed):
    seqs, dp, nb = fake_batch(seed, dp_size=2, batch_num_tokens=40)
    model_output, data, leaf = as_verl(seqs, dp, nb, dtype=torch.float64)
    loss, metrics = VerlLoss(name, **params)(model_output=model_output, data=data, dp_group=None)
    assert metrics == {}
    assert loss.item() == pytest.approx(reference_loss(name, seqs, dp, nb, params), rel=1e-12, abs=1e-14)
    grad, = torch.autograd.grad(loss, leaf)
    # the reference's gradient, by float64 autograd of the reference formula per token
    ref_grad = torch.zeros_like(leaf)
    start = 0
    for s in seqs:
        for t in range(len(s["mask"]) - 1):
            if s["mask"][t + 1]:
                x = torch.tensor(float(s["logp"][t]), dtype=torch.float64, requires_grad=True)
                p, old, w = x.exp(), float(s["old"][t]), float(s["weights"][t + 1])
                value = {"sft": lambda: -x, "dft": lambda: -p.detach() * x,
                         "prob": lambda: (1 - p ** params.get("alpha", 1.0)) / params.get("alpha", 1.0),
                         "profit": lambda: -x * float(p.item() >= params.get("tau", 0.1)),
                         "psft": lambda: -torch.minimum(torch.exp(x - old),
                                                        torch.tensor(1 + params.get("eps", 0.28), dtype=torch.float64)),
                         "token_weighted": lambda: -w * x}[name]()
                g, = torch.autograd.grad(value, x)
                ref_grad[start + t] = g / nb * dp
        start += len(s["mask"])
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


def test_sft_is_verl_sft_loss_formula_in_float32():
    """verl's sft_loss: -masked_sum(log_prob, roll(loss_mask, -1)) / batch_num_tokens * dp_size."""
    seqs, dp, nb = fake_batch(3, lengths=(9, 3, 6, 5), dp_size=4, batch_num_tokens=77)
    model_output, data, leaf = as_verl(seqs, dp, nb)
    loss, _ = verl_loss("sft")(model_output=model_output, data=data)
    mask = torch.roll(data["loss_mask"].values(), -1, 0).to(torch.float32)
    assert loss.item() == pytest.approx((-(leaf.detach() * mask).sum() / nb * dp).item(), rel=1e-6)


def test_padded_mode_reads_response_mask_unshifted():
    """verl's sft_loss in a padded mode: -masked_sum(log_prob, response_mask) / batch_num_tokens * dp_size, the
    response mask already aligned with log_prob (no roll)."""
    g = torch.Generator().manual_seed(7)
    lp = torch.log(torch.rand(3, 5, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    data = {"pad_mode": "right", "response_mask": mask, "dp_size": 2, "batch_num_tokens": 12}
    loss, _ = VerlLoss("dft")(model_output={"log_probs": lp}, data=data)
    p = lp.detach().exp()
    assert loss.item() == pytest.approx((-(p * lp.detach() * mask).sum() / 12 * 2).item(), rel=1e-12)


def test_micro_batches_sum_to_the_global_token_mean():
    """Two micro-batches normalised by the global batch's token count (and dp_size 1) sum to the token mean
    of the whole batch: the normalisation verl's engine relies on when it sums micro-batch gradients."""
    seqs, _, _ = fake_batch(4, lengths=(6, 5, 8, 4))
    n_all = sum(sum(s["mask"]) for s in seqs)
    parts = [as_verl(seqs[:2], 1, n_all, torch.float64), as_verl(seqs[2:], 1, n_all, torch.float64)]
    total = sum(VerlLoss("dft")(model_output=m, data=d)[0].item() for m, d, _ in parts)
    mean = sum(-math.exp(float(s["logp"][t])) * float(s["logp"][t])
               for s in seqs for t in range(len(s["mask"]) - 1) if s["mask"][t + 1]) / n_all
    assert total == pytest.approx(mean, rel=1e-12)


def test_label_terms_reuse_the_objectives_own_terms():
    """label_terms runs the catalogue's own `terms`: equal to the full-logits path's per-token loss."""
    torch.manual_seed(0)
    logits = torch.randn(6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (6,))
    logp_y = logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    old = logp_y + 0.3
    from qtarget.objectives.base import TokenInputs
    for name in ("sft", "dft", "prob", "profit", "psft", "nll_masked", "prob_masked"):
        obj = get_objective(name)
        aux = {"old_logprobs": old} if "old_logprobs" in obj.needs else {}
        full = obj.terms(TokenInputs(logits=logits, labels=labels, **aux)).loss
        torch.testing.assert_close(label_terms(obj, logp_y, **aux).loss, full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,what", [("target_sft", "teacher_logits"), ("asft", "ref_logits"),
                                       ("kd", "teacher_logits"), ("eaft", "distribution"),
                                       ("gem", "distribution"), ("label_smoothing", "logits"),
                                       ("target", "distribution")])
def test_objectives_that_need_more_than_the_label_log_prob_are_refused(name, what):
    with pytest.raises(NeedsDistributionError, match=what) as info:
        VerlLoss(name)
    assert name in str(info.value) and "distillation_use_topk" in str(info.value)


def test_custom_label_only_objective_is_accepted():
    from qtarget.objectives.base import Objective, TokenTerms

    class Cubic(Objective):
        name = "cubic"

        def terms(self, x):
            return TokenTerms(loss=-(x.p_y_detached ** 3) * x.logp_y, gamma=x.p_y_detached ** 3)

    check_label_only(Cubic())
    seqs, dp, nb = fake_batch(5)
    model_output, data, _ = as_verl(seqs, dp, nb, torch.float64)
    loss, _ = VerlLoss(Cubic())(model_output=model_output, data=data)
    ref = sum(-math.exp(3 * float(s["logp"][t])) * float(s["logp"][t])
              for s in seqs for t in range(len(s["mask"]) - 1) if s["mask"][t + 1]) / nb
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_missing_batch_fields_are_named():
    seqs, dp, nb = fake_batch(6)
    model_output, data, _ = as_verl(seqs, dp, nb)
    del data["old_log_probs"]
    with pytest.raises(ValueError, match="needs `old_log_probs` in the batch"):
        VerlLoss("psft")(model_output=model_output, data=data)
    del data["batch_num_tokens"]
    with pytest.raises(ValueError, match="batch_num_tokens"):
        VerlLoss("sft")(model_output=model_output, data=data)
    with pytest.raises(ValueError, match="unknown objective 'dtf'"):
        VerlLoss("dtf")


def test_loss_module_imports_neither_verl_nor_transformers():
    code = ("import sys, qtarget.integrations.verl; "
            "print(sorted(m for m in ('verl', 'transformers', 'tensordict') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ verl venv
verl_venv = pytest.mark.skipif(not any(VERL_VENV.glob(".qtarget-verl-*")),
                               reason=f"no verl venv at {VERL_VENV} (scripts/setup_verl.sh builds it)")


def run_driver(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([str(VERL_PYTHON), str(ROOT / "tests" / "test_integration_verl_driver.py"), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.verl
@verl_venv
def test_verl_engine_forward_step_matches_sft_loss_and_the_dft_fork():
    out = run_driver("engine")
    # sft: qtarget's loss through verl's engine equals verl's own sft_loss, loss and every gradient
    assert out["versions"]["verl"] == "0.9.1"
    for key in ("sft", "dft"):
        r = out[key]
        assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-5, abs=1e-7), (key, r)
        assert r["grad_max_abs_diff"] <= 1e-5 * max(r["grad_max_abs"], 1e-6), (key, r)
        assert r["batch_num_tokens"] == r["supervised_tokens"] and r["micro_batches"] >= 2, (key, r)
    assert out["dft"]["loss"] != pytest.approx(out["sft"]["loss"], rel=1e-3)
    # psft with old_log_probs in the batch (log-probs of a forward-only pass, minus 0.2): every ratio e^0.2
    psft = out["psft"]
    assert psft["loss_inside"] == pytest.approx(-math.exp(0.2), rel=1e-5)
    assert psft["grad_inside_max_abs_diff"] <= 1e-5 * math.exp(0.2) * out["sft"]["grad_max_abs"]
    assert psft["loss_clipped"] == pytest.approx(-1.2, rel=1e-6) and psft["grad_clipped_max_abs"] == 0.0


@pytest.mark.verl
@verl_venv
def test_verl_venv_refuses_a_full_distribution_objective_in_one_line():
    proc = subprocess.run([str(VERL_PYTHON), "-c", "from qtarget.integrations.verl import VerlLoss; VerlLoss('target_sft')"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode != 0 and "needs `teacher_logits`" in proc.stderr


@pytest.mark.verl
@verl_venv
def test_entry_point_installs_the_objective_from_verls_own_config():
    """verl's hydra config with +qtarget overrides; QTargetSFTTrainer replaces verl's sft_loss through the
    same set_loss_fn hook (verl's TrainingWorker recorded: its trainer needs NCCL and a GPU engine)."""
    out = run_driver("entry")
    assert out["objective_from_config"] == ["prob", {"alpha": 0.5}]
    assert out["set_loss_fn_calls"] == ["sft_loss", "VerlLoss"] and out["final_is_installed"]
    assert out["final_loss"] == "VerlLoss(prob(alpha=0.5))"
