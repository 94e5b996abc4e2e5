"""Mixed precision on CPU: bf16 hidden states and head with float32 loss math and a float32 head-gradient
accumulator, against the float32 reference, within tolerances derived from bf16's precision; a tiny
model trained under `torch.autocast("cpu", bfloat16)`; teacher / reference models in their own dtype.

Where the tolerances come from. bf16 keeps 8 significant bits: a value rounded to bf16 carries a
relative error of at most u = 2^-8. A bf16 GEMM on CPU accumulates its length-H dot products in
float32 (error ~ H * 2^-24, negligible next to u for H <= 4096) and rounds each output once, so a
bf16 logit is z (1 + d), |d| <= u: |dz| <= u M with M = max_v |z_v| in its row. For sft the logit
gradient is g = (p - delta_y) / n; to first order |dp_v| <= p_v (|dz_v| + sum_w p_w |dz_w|) <= 2 u M p_v,
and the per-token loss moves by at most sum_v |g_v| |dz_v| <= 2 u M. The gradients of hidden (g W in
bf16: g rounded once, the output rounded once) and of the head (g^T h summed over chunks in float32,
rounded to bf16 once at the end) then obey the elementwise bounds written out in the test. The head
bound holds however many chunks are summed only because the accumulator is float32: the test also
shows that rounding the running sum to bf16 after every chunk breaks it.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import qtarget
from qtarget import fused_token_loss, token_loss
from qtarget.data import Collator, prepare_data
from qtarget.models import tiny_causal_lm
from qtarget.models.load import load_aux_model
from qtarget.training import train
from qtarget.training.config import QTargetConfig
from test_train_support import config, tiny, tokenizer, toy_rows

U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
SLACK = 1.25  # room for second-order terms of the first-order bounds below


def bf16_problem(n=48, H=64, V=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(torch.bfloat16)
    W = (torch.randn(V, H, generator=g) * (3.0 / math.sqrt(H))).to(torch.bfloat16)
    y = torch.randint(0, V, (n,), generator=g)
    return h, W, y


def check_bf16_sft_bounds(chunk_size: int, device: str = "cpu") -> None:
    """The bf16 fused sft loss and gradients on `device` against the float64 truth, within the
    first-order bounds of the module docstring (also used by tests/test_cuda_engine.py)."""
    h, W, y = bf16_problem()
    hb, Wb = h.to(device).requires_grad_(True), W.to(device).requires_grad_(True)
    got = fused_token_loss("sft", hb, Wb, y.to(device), chunk_size=chunk_size)
    got.loss.backward()
    assert got.loss.dtype == torch.float32 and hb.grad.dtype == Wb.grad.dtype == torch.bfloat16

    # float64 truth on the same (bf16-representable) values
    h64, W64 = h.double(), W.double()
    z = h64 @ W64.T
    n = z.shape[0]
    p = torch.softmax(z, -1)
    g = (p - torch.nn.functional.one_hot(y, z.shape[1]).double()) / n
    M = z.abs().amax(-1, keepdim=True)  # [n, 1]
    loss = (torch.logsumexp(z, -1) - z.gather(-1, y[:, None]).squeeze(-1)).mean()

    assert abs(float(got.loss.detach()) - float(loss)) <= SLACK * float((2 * U * M).mean())
    # hidden: |d (gW)| <= sum_v (|dg_v| + u |g_v|) |W_v| + u |gW|, |dg_v| <= 2 u M p_v / n
    dg = 2 * U * M * p / n
    bound_h = (dg + U * g.abs()) @ W64.abs() + U * (g @ W64).abs()
    err_h = (hb.grad.double().cpu() - g @ W64).abs()
    assert bool((err_h <= SLACK * bound_h + 1e-30).all()), float((err_h / bound_h).max())
    # head: |d (g^T h)| <= sum_t (|dg_t| + u |g_t|) |h_t| + u |g^T h|  (the u |g| term: CUDA's GEMM
    # reads g in bf16 and writes float32; float32 accumulation: no term per chunk)
    bound_w = (dg + U * g.abs()).T @ h64.abs() + U * (g.T @ h64).abs()
    err_w = (Wb.grad.double().cpu() - g.T @ h64).abs()
    assert bool((err_w <= SLACK * bound_w + 1e-30).all()), float((err_w / bound_w).max())


@pytest.mark.parametrize("chunk_size", [4, 48])
def test_bf16_sft_within_derived_bounds(chunk_size):
    check_bf16_sft_bounds(chunk_size)


def test_bf16_accumulator_would_break_the_head_bound():
    """The bound above is tight enough to catch a bf16 running sum of 12 chunk contributions."""
    h, W, y = bf16_problem()
    h64, W64 = h.double(), W.double()
    z = h64 @ W64.T
    n = z.shape[0]
    p = torch.softmax(z, -1)
    g = (p - torch.nn.functional.one_hot(y, z.shape[1]).double()) / n
    acc = torch.zeros(W.shape, dtype=torch.bfloat16)
    for s in range(0, n, 4):  # exact chunk contributions, running sum rounded to bf16 each time
        acc = (acc.double() + g[s:s + 4].T @ h64[s:s + 4]).to(torch.bfloat16)
    M = z.abs().amax(-1, keepdim=True)
    bound_w = (2 * U * M * p / n + U * g.abs()).T @ h64.abs() + U * (g.T @ h64).abs()
    assert bool(((acc.double() - g.T @ h64).abs() > SLACK * bound_w).any())


@pytest.mark.parametrize("name", ["dft", "target_sft"])
def test_bf16_other_objectives_close_to_float32(name):
    """dft and target_sft (bf16 teacher hidden + head): the logit gradient c (p - Q) moves with both p
    and Q, each perturbed by at most 2 u M relative: relative errors within 4 u M (+ the roundings
    of the returned bf16 gradients)."""
    h, W, y = bf16_problem(seed=1)
    g = torch.Generator().manual_seed(2)
    th = torch.randn(h.shape[0], 32, generator=g).to(torch.bfloat16)
    tW = (torch.randn(W.shape[0], 32, generator=g) * (3.0 / math.sqrt(32))).to(torch.bfloat16)
    kw = dict(teacher_hidden=th, teacher_head=tW) if name == "target_sft" else {}
    hb, Wb = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    got = fused_token_loss(name, hb, Wb, y, chunk_size=8, **kw)
    got.loss.backward()
    h32, W32 = h.float().requires_grad_(True), W.float().requires_grad_(True)
    aux = {"teacher_logits": th.float() @ tW.float().T} if kw else {}
    want = token_loss(name, h32 @ W32.T, y, **aux)
    want.loss.backward()
    M = float(torch.maximum((h.float() @ W.float().T).abs().max(), aux["teacher_logits"].abs().max()
                            if aux else torch.tensor(0.0)))
    tol = SLACK * (4 * U * M + 2 * U)
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=tol)
    for a, b, what in ((hb.grad, h32.grad, "hidden"), (Wb.grad, W32.grad, "weight")):
        err = float((a.float() - b).abs().max() / b.abs().max())
        assert err <= tol, f"{what}: {err:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- autocast training
def run_steps(model, batches, autocast: bool, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, nll = [], []
    for ids, labels in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=labels)
        assert out.loss.dtype == torch.float32
        out.loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        nll.append(out.metrics["nll"])
    return losses, nll


@pytest.mark.parametrize("objective", ["sft", "dft"])
def test_autocast_bf16_training_matches_float32(objective):
    """Four SGD steps of a 2-layer Llama with the fused loss, float32 vs autocast bf16 (float32
    master weights). Every linear layer's output is rounded to bf16 once: K = 7 per block + the
    head = 15 roundings, each moving the logits by at most u relative to first order, so the loss of
    a step moves by at most 2 u K M (M = max |logit|, ~3 here); parameters after four steps stay
    within 2 u K of the float32 run's total update."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    batches = [(ids, labels)] * 4  # one batch: its loss must go down
    base = tiny_causal_lm(128, hidden_size=32, num_layers=2, num_heads=2, seed=0).train()
    a = qtarget.patch(copy.deepcopy(base), objective)
    b = qtarget.patch(copy.deepcopy(base), objective)
    (fp32, nll32), (mixed, nll16) = run_steps(a, batches, False), run_steps(b, batches, True)
    with torch.no_grad():
        M = float(base(input_ids=batches[0][0]).logits.abs().max())
    K = 7 * 2 + 1
    for step, (x, y) in enumerate(zip(fp32, mixed)):
        assert abs(x - y) <= SLACK * 2 * U * K * M, (step, x, y)
    assert nll32[-1] < nll32[0] and nll16[-1] < nll16[0]  # both train (dft's loss value need not fall)
    start = dict(base.named_parameters())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        update = (pa - start[name]).norm()
        if update > 0:
            assert float((pa - pb).norm() / update) <= 2 * U * K, name


# ------------------------------------------------------------------------------ auxiliary dtypes
def test_aux_dtype_config_keys():
    cfg = QTargetConfig(output_dir="unused", teacher_dtype="bfloat16", dtype="float32", use_cpu=True, report_to="none")
    assert cfg.aux_dtype("teacher") == "bfloat16" and cfg.aux_dtype("ref") == "float32"
    with pytest.raises(ValueError, match="ref_dtype must be one of auto, float32, bfloat16, float16; got 'bf16'"):
        QTargetConfig(output_dir="unused", ref_dtype="bf16", use_cpu=True, report_to="none")


def test_teacher_loaded_in_bf16_and_loss_matches_a_bf16_teacher(tmp_path):
    tok = tokenizer()
    folder = tmp_path / "teacher"
    tiny(seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    teacher = load_aux_model(str(folder), role="teacher", student_tokenizer=tok, student_name="student",
                             dtype="bfloat16")
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in teacher.parameters())

    # the fused loss with the bf16 teacher == token_loss on the student's float32 logits and the
    # bf16 teacher's own logits (its bf16 head output, cast to float32)
    data = prepare_data(toy_rows(4), tok, max_length=48)
    batch = Collator(tok.pad_token_id)(data.train.examples)
    n = int(batch["labels"][:, 1:].ne(-100).sum())
    student = tiny(seed=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_logits = student(**inputs).logits[:, :-1]
        t_logits = teacher(**inputs).logits[:, :-1]
    assert t_logits.dtype == torch.bfloat16
    want = token_loss(qtarget.get_objective("target_sft", eta=0.5), s_logits, batch["labels"][:, 1:],
                      teacher_logits=t_logits.float(), reduction="sum", normalizer=float(n))
    patched = qtarget.patch(copy.deepcopy(student), "target_sft", teacher=teacher, eta=0.5)
    got = patched(**inputs, labels=batch["labels"], num_items_in_batch=n)
    # the engine forms the teacher's logits with its own bf16 GEMM over chunks of rows: the same
    # products, each rounded once to bf16 (a blocked float32 sum may round the other way: one bf16
    # ulp on a few logits, u M ~ 0.02 at most, well under 1e-3 of the loss on average)
    assert float(got.loss.detach()) == pytest.approx(float(want.loss), rel=1e-3)
    assert got.metrics["kl_teacher"] == pytest.approx(want.metrics["kl_teacher"], rel=1e-2, abs=1e-4)

    # through the trainer: `teacher_dtype` loads the teacher in bf16 next to a float32 student
    cfg = config(tmp_path / "run", objective="target_sft", teacher_model=str(folder), teacher_dtype="bfloat16",
                 max_steps=1)
    result = train(cfg, model=tiny(seed=0), tokenizer=tok, train_dataset=data.train, save_final=False)
    assert {p.dtype for p in result.trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in result.trainer.model.parameters()} == {torch.float32}
    assert math.isfinite(result.history[0]["loss"])


def test_ref_dtype_casts_the_frozen_initial_student(tmp_path):
    tok = tokenizer()
    data = prepare_data(toy_rows(4), tok, max_length=48)
    cfg = config(tmp_path, objective="sft_kl", ref_dtype="bfloat16", max_steps=1)
    result = train(cfg, model=tiny(seed=0), tokenizer=tok, train_dataset=data.train, save_final=False)
    assert {p.dtype for p in result.trainer.ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in result.trainer.model.parameters()} == {torch.float32}
    assert math.isfinite(result.history[0]["loss"])
