"""Layer 2: any objective computed from hidden states and the LM-head weight, chunk by chunk.

The `[N, V]` logits are never held: the supervised rows are cut into chunks of `c` rows, and for each
chunk the engine forms the float32 logits `[c, V]`, runs the objective's own `terms` on them (the same
code as the reference path), takes the logit gradient with `torch.autograd.grad` and chains it
through softcap, scale and the matmul:

    raw = h_c @ W^T + b            (matmul in the compute dtype: the inputs' or autocast's)
    z   = softcap * tanh(scale * raw / softcap)      (or scale * raw without softcap)
    g   = dL/dz                    (autograd on the objective, float32)
    g_raw = g * scale * (1 - tanh^2)
    grad_h_c = g_raw @ W,  grad_W += g_raw^T @ h_c  (float32 accumulator),  grad_b += sum_rows g_raw

No per-objective backward code exists, so every registered objective (user ones included) is exact.
Teacher and reference logits are formed chunk by chunk in the same way from their own hidden states
and heads, under no_grad.

Two modes:
- "forward" (default): the gradients are formed during the forward pass (like Liger-Kernel's fused
  linear cross-entropy); backward only scales them by the incoming scalar gradient. One logits
  matmul per chunk instead of two; the saved gradients (`[n, H]` and float32 `[V, H]`) are freed by
  the first backward, so a second backward through the same graph (retain_graph) is refused.
- "recompute": forward saves only its inputs; backward recomputes every chunk. Use it when the
  backward may run more than once or the loss is not consumed right away.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from qtarget.models.head import LMHead
from qtarget.objectives.base import Objective
from qtarget.objectives.metrics import MetricSums
from qtarget.objectives.registry import get_objective
from qtarget.objectives.supervised import (
    LossResult,
    apply_loss_weights,
    check_finite as assert_finite,
    reduction_weights,
    supervised_rows,
)
from qtarget.ops.budget import resolve_chunk_size
from qtarget.ops.kernels import Kernel, closed_form_step, select_kernel
from qtarget.ops.sparse_teacher import TeacherTopK, check_teacher_topk, dense_teacher_logprobs
from qtarget.ops.workspace import Workspace, workspace_for_call

MODES = ("auto", "forward", "recompute")


@dataclass(eq=False)
class AuxSource:
    """Where one auxiliary distribution (teacher or reference) comes from, for the rows of a chunk:
    precomputed logits [N, V], hidden states [N, H_aux] through the aux model's own head (its bias,
    scale and softcap; put on the student's V by `LMHead.vocab_size`), or a sparse top-k teacher
    densified per chunk (`teacher_tail` decides the mass outside the top-k). All detached."""

    logits: Tensor | None = None  # [N, V]
    hidden: Tensor | None = None  # [N, H_aux]
    head: LMHead | None = None
    compute_dtype: torch.dtype | None = None
    topk: TeacherTopK | None = None  # [n, k] already restricted to the supervised rows
    tail: str = "student"

    def chunk(self, idx: Tensor, rows: slice, student_logits: Tensor, ws: Workspace, who: str) -> Tensor:
        """[c, V] float logits (or log-probs) for positions `idx` (= supervised rows `rows`), in
        buffers of `ws` named after `who` where they can be."""
        if self.logits is not None:
            if self.logits.dtype in (torch.float32, torch.float64):
                return torch.index_select(self.logits, 0, idx, out=ws.take(who, idx.numel(), self.logits.shape[1],
                                                                          self.logits.dtype))
            return self.logits.index_select(0, idx).float()
        if self.topk is not None:
            return dense_teacher_logprobs(self.topk.ids[rows], self.topk.logprobs[rows], self.topk.log_tail[rows],
                                          student_logits.detach(), self.tail, ws, who)
        head = self.head
        h = self.hidden.index_select(0, idx).to(self.compute_dtype)
        z = _logits(h, head.weight, head.bias, ws, who)  # weight already in compute_dtype (cast once per call)
        z = _transform(z, head.logit_scale, head.softcap, ws, who)[0]
        if head.vocab > head.rows:  # rows the aux head lacks: probability 0 (lowest finite logit, see `finite`)
            z = torch.cat([z, z.new_full((z.shape[0], head.vocab - head.rows), torch.finfo(z.dtype).min)], dim=-1)
        return z

    @property
    def finite(self) -> bool:
        """Chunks hold no -inf (logits formed from hidden states; given logits and sparse teachers may)."""
        return self.hidden is not None


@dataclass(eq=False)
class _ChunkPlan:
    """One call's fixed (non-differentiable) data. `rows` [n] indexes the supervised positions in
    the flattened [N, ...] inputs; per-row tensors below are already restricted to them, while the
    big ones (hidden states, precomputed logits) stay whole and are indexed chunk by chunk."""

    objective: Objective
    rows: Tensor  # [n] int64 positions of supervised tokens in [0, N)
    labels: Tensor  # [n] int64
    weights: Tensor  # [n] float32 reduction weights: loss = sum(per_token * weights)
    compute_dtype: torch.dtype  # dtype of the student matmuls
    logit_scale: float
    softcap: float | None
    chunk: int
    metrics: bool
    teacher: AuxSource | None = None
    ref: AuxSource | None = None
    old_logprobs: Tensor | None = None  # [n] float32
    token_weights: Tensor | None = None  # [n] float32
    kernel: Kernel = closed_form_step  # the chunk math after the logits GEMM (ops/kernels.py)


@dataclass
class _PassOutput:
    loss: Tensor  # [] float32, detached
    per_token: Tensor  # [n] float32, detached
    metrics: dict[str, float]
    grad_hidden: Tensor | None  # [N, H] hidden's dtype, 0 at unsupervised rows
    grad_weight: Tensor | None  # [V, H] float32
    grad_bias: Tensor | None  # [V] float32


def _no_autocast(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, ValueError, TypeError):
        pass
    return None


def _accumulate_weight_grad(acc: Tensor, g: Tensor, g_low: Tensor, h_c: Tensor) -> None:
    """acc [V, H] += g^T @ h_c without rounding a low-precision product to bf16/fp16 first.
    g [c, V] in the accumulator's dtype, g_low the same in h_c's (compute) dtype."""
    if h_c.dtype == acc.dtype:
        acc.addmm_(g.t(), h_c)
        return
    if acc.device.type == "cuda":
        try:  # low-precision GEMM with float32 output (torch >= 2.8 on CUDA)
            torch.addmm(acc, g_low.t(), h_c, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    acc.addmm_(g.t(), h_c.to(acc.dtype))


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, ws: Workspace, name: str) -> Tensor:
    """Float logits [c, V] = h @ W^T + b: the GEMM in the compute dtype into a buffer of `ws`, then
    float32 (float64 stays float64) in another buffer when the compute dtype is lower."""
    raw = ws.take(f"{name}_raw", h.shape[0], weight.shape[0], h.dtype)
    raw = torch.mm(h, weight.t(), out=raw) if bias is None else torch.addmm(bias, h, weight.t(), out=raw)
    if raw.dtype in (torch.float32, torch.float64):
        return raw
    return ws.take(f"{name}_float", raw.shape[0], raw.shape[1], torch.float32).copy_(raw)


def _transform(z: Tensor, scale: float, cap: float | None, ws: Workspace, name: str) -> tuple[Tensor, Tensor | None]:
    """(softcap(scale * z), tanh term or None) on float logits [c, V], in place (z is a buffer of
    the call's workspace; the tanh term gets its own, under `name`)."""
    if scale != 1.0:
        z.mul_(scale)
    if cap is None:
        return z, None
    t = torch.div(z, cap, out=ws.like(f"{name}_tanh", z)).tanh_()
    return torch.mul(t, cap, out=z), t


def _run_chunks(p: _ChunkPlan, hidden: Tensor, weight: Tensor, bias: Tensor | None, *,
                grad_hidden: bool, grad_weight: bool, grad_bias: bool, collect: bool) -> _PassOutput:
    """One pass over the supervised rows `p.rows` of `hidden [N, H]` in chunks of `p.chunk` rows.

    Returns the weighted loss, the per-token loss [n] and metrics (when `collect`), and the requested
    gradients of the weighted loss (for grad_output = 1). Nothing returned keeps a graph."""
    cdt = p.compute_dtype
    want_grad = grad_hidden or grad_weight or grad_bias
    hidden, weight = hidden.detach(), weight.detach()
    N, H = hidden.shape
    n = p.rows.numel()
    V = weight.shape[0]
    device = hidden.device
    w_c = weight.to(cdt)
    b_c = None if bias is None else bias.detach().to(cdt)

    loss_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    total = torch.zeros((), dtype=loss_dtype, device=device)
    per_token = torch.zeros(n, dtype=torch.float32, device=device)
    g_h = torch.zeros((N, H), dtype=hidden.dtype, device=device) if grad_hidden else None
    g_w = torch.zeros((V, H), dtype=loss_dtype, device=device) if grad_weight else None
    g_b = torch.zeros(V, dtype=loss_dtype, device=device) if grad_bias else None
    sums = MetricSums()
    scale, cap = float(p.logit_scale), p.softcap
    finite_aux = tuple(who for who, src in (("teacher", p.teacher), ("ref", p.ref)) if src is not None and src.finite)

    # the chunks' [c, V] buffers: allocated by the first chunk (of the first call, on CPU), reused by the others
    with workspace_for_call(device, p.chunk, V) as ws:
        for start in range(0, n, p.chunk):
            sl = slice(start, min(n, start + p.chunk))
            idx = p.rows[sl]
            h_c = hidden.index_select(0, idx).to(cdt)
            # loss math in float32 (float64 inputs stay float64, e.g. for gradcheck)
            z, t = _transform(_logits(h_c, w_c, b_c, ws, "z"), scale, cap, ws, "z")
            aux = dict(
                labels=p.labels[sl],
                teacher_logits=None if p.teacher is None else p.teacher.chunk(idx, sl, z, ws, "teacher"),
                ref_logits=None if p.ref is None else p.ref.chunk(idx, sl, z, ws, "ref"),
                old_logprobs=None if p.old_logprobs is None else p.old_logprobs[sl],
                token_weights=None if p.token_weights is None else p.token_weights[sl],
            )
            step = p.kernel(p.objective, z, aux, p.weights[sl], want_grad=want_grad, metrics=collect and p.metrics,
                            finite_aux=finite_aux, workspace=ws)
            if want_grad:
                g = step.grad
                # chain through softcap and scale: dz/draw = scale * (1 - tanh^2)
                if t is not None:
                    g.mul_(t.square_().neg_().add_(1.0))
                if scale != 1.0:
                    g.mul_(scale)
                g_low = g if g.dtype == cdt else ws.take("g_low", g.shape[0], V, cdt).copy_(g)
                if g_h is not None:
                    g_h.index_copy_(0, idx, torch.mm(g_low, w_c).to(g_h.dtype))
                if g_w is not None:
                    _accumulate_weight_grad(g_w, g, g_low, h_c)
                if g_b is not None:
                    g_b += g.sum(0)
                del g, g_low
            total += step.weighted
            if collect:
                per_token[sl] = step.loss.float()
                if step.metrics is not None:
                    sums.add(step.metrics)
            del aux, z, t, step  # free this chunk's [c, V] temporaries before the next one
    metrics = sums.means() if (collect and p.metrics) else {}
    return _PassOutput(total, per_token, metrics, g_h, g_w, g_b)


class _FusedLoss(torch.autograd.Function):
    """loss = sum_rows weights * objective(logits(hidden, weight, bias)); inputs hidden [N, H],
    weight [V, H], bias [V] | None. Returns (loss [], per_token [n] non-differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _ChunkPlan, mode: str, sink: dict):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mode = mode
        with _no_autocast(hidden.device.type):
            if mode == "forward":
                out = _run_chunks(plan, hidden, weight, bias, grad_hidden=need_h, grad_weight=need_w,
                                  grad_bias=need_b, collect=True)
                ctx.grads = (out.grad_hidden, out.grad_weight, out.grad_bias)
            else:
                out = _run_chunks(plan, hidden, weight, bias, grad_hidden=False, grad_weight=False,
                                  grad_bias=False, collect=True)
                ctx.plan = plan
                ctx.save_for_backward(hidden, weight, bias)
        sink["metrics"] = out.metrics
        ctx.mark_non_differentiable(out.per_token)
        return out.loss, out.per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_per_token):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.mode == "forward":
            if ctx.grads is None:
                raise RuntimeError("fused_token_loss(mode='forward') frees its saved gradients after the first "
                                   "backward; use mode='recompute' to backward through the same loss twice")
            g_h, g_w, g_b = ctx.grads
            ctx.grads = None
        else:
            hidden, weight, bias = ctx.saved_tensors
            with _no_autocast(hidden.device.type):
                out = _run_chunks(ctx.plan, hidden, weight, bias, grad_hidden=need_h, grad_weight=need_w,
                                  grad_bias=need_b and bias is not None, collect=False)
            g_h, g_w, g_b = out.grad_hidden, out.grad_weight, out.grad_bias
        h_dt, w_dt, b_dt = ctx.dtypes
        # The buffers belong to this backward alone (freed or freshly recomputed): scale in place, so
        # the float32 [V, H] gradient exists once.
        grad_h = None if g_h is None or not need_h else g_h.mul_(grad_loss.to(g_h.dtype)).to(h_dt)
        grad_w = None if g_w is None or not need_w else g_w.mul_(grad_loss.to(g_w.dtype)).to(w_dt)
        grad_b = None if g_b is None or not need_b else g_b.mul_(grad_loss.to(g_b.dtype)).to(b_dt)
        return grad_h, grad_w, grad_b, None, None, None


def _as_head(name: str, head: LMHead | Tensor, hidden_name: str, hidden: Tensor) -> LMHead:
    """An LMHead from an LMHead or a bare [V, H] weight (no bias, scale 1, no softcap), checked."""
    if isinstance(head, Tensor):
        head = LMHead(weight=head)
    if not isinstance(head, LMHead):
        raise ValueError(f"`{name}` must be an LMHead or a [V, H] tensor, got {type(head).__name__}")
    w = head.weight
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"`{name}` weight must be a [V, H] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if not w.dtype.is_floating_point or not hidden.dtype.is_floating_point:
        raise ValueError(f"`{name}` and `{hidden_name}` must be floating point, got {w.dtype} and {hidden.dtype}")
    if w.shape[1] != hidden.shape[-1]:
        raise ValueError(f"`{name}` has hidden size {w.shape[1]} (shape {tuple(w.shape)}) but "
                         f"`{hidden_name}` has hidden size {hidden.shape[-1]}")
    if head.bias is not None and (not isinstance(head.bias, Tensor) or tuple(head.bias.shape) != (head.rows,)):
        raise ValueError(f"`{name}` bias must have shape ({head.rows},), got "
                         f"{tuple(head.bias.shape) if isinstance(head.bias, Tensor) else head.bias!r}")
    if head.softcap is not None and not float(head.softcap) > 0:
        raise ValueError(f"`{name}` softcap must be None or > 0, got {head.softcap}")
    if not math.isfinite(float(head.logit_scale)):
        raise ValueError(f"`{name}` logit_scale must be a finite number, got {head.logit_scale}")
    return head


def fused_token_loss(
    objective: str | Objective,
    hidden: Tensor,
    lm_head: LMHead | Tensor,
    labels: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head: LMHead | Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_head: LMHead | Tensor | None = None,
    teacher_logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    teacher_topk: TeacherTopK | None = None,
    teacher_tail: str = "student",
    old_logprobs: Tensor | None = None,
    token_weights: Tensor | None = None,
    loss_weights: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    mode: str = "auto",
    metrics: bool = True,
    check_finite: bool = True,
) -> LossResult:
    """Loss of `objective` on logits = softcap(logit_scale * (hidden @ W^T + b)) without materialising
    the `[N, V]` logits. Same result as `token_loss` on those logits.

    hidden [..., H] (e.g. [N, H] or [B, T, H]) aligned with labels [...] (no shift inside; shift
    before calling). lm_head: an `LMHead` (weight [V, H], bias, logit_scale, softcap; see
    `qtarget.models.head.lm_head_of`) or a bare weight [V, H] with `lm_head_bias` [V], `logit_scale`
    and `softcap` given here. softcap(z) = softcap * tanh(z / softcap), applied after the scale.
    Matmuls run in the inputs' dtype (or the autocast dtype under `torch.autocast`), the loss in
    float32; grad of the weight is accumulated in float32.

    Teacher / reference distributions (all detached), one source each:
    - `teacher_hidden [..., H_t]` + `teacher_head` (an LMHead: the teacher's own weight, bias, scale
      and softcap; `LMHead.on_vocab(V)` puts a head padded to another row count on the student's V;
      a bare tensor means weight only), formed per chunk under no_grad; likewise `ref_hidden` + `ref_head`;
    - precomputed `teacher_logits [..., V]` / `ref_logits [..., V]`;
    - `teacher_topk` (a sparse top-k teacher, `qtarget.ops.sparse_teacher.TeacherTopK` [..., k]) with
      `teacher_tail` deciding where the mass outside the top-k goes ("renormalize", "student", "uniform").
    `old_logprobs`/`token_weights`/`loss_weights` [...] as in `token_loss`.

    reduction / normalizer: as `token_loss`. chunk_size: rows per chunk; by default chosen from
    `memory_budget` bytes (see qtarget.ops.budget). mode: "auto" (= "forward"), "forward" (gradients
    formed in the forward pass) or "recompute" (backward recomputes each chunk). metrics=False skips the
    metric values. Returns LossResult(loss [] float32, per_token [labels.shape] float32 detached, metrics).
    """
    objective = get_objective(objective)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    if not isinstance(hidden, Tensor) or hidden.dim() != labels.dim() + 1 or tuple(hidden.shape[:-1]) != tuple(labels.shape):
        shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise ValueError(f"hidden shape {shape} does not match labels shape {tuple(labels.shape)}: expected "
                         f"hidden [..., H] with [...] == labels' shape")
    if isinstance(lm_head, LMHead):
        if lm_head_bias is not None or logit_scale != 1.0 or softcap is not None:
            raise ValueError("give the bias, logit_scale and softcap inside the LMHead, not as arguments too")
        head = _as_head("lm_head", lm_head, "hidden", hidden)
        if head.vocab != head.rows:
            raise ValueError(f"the student's lm_head must give logits for its own {head.rows} rows, "
                             f"got vocab_size={head.vocab}")
    else:
        head = _as_head("lm_head", LMHead(weight=lm_head, bias=lm_head_bias, logit_scale=logit_scale,
                                          softcap=softcap) if isinstance(lm_head, Tensor) else lm_head,
                        "hidden", hidden)
    V = head.rows
    positions = tuple(labels.shape)

    # Teacher / reference sources: hidden + head, precomputed logits or (teacher) a sparse top-k.
    given = {"teacher_logits": teacher_logits, "ref_logits": ref_logits,
             "old_logprobs": old_logprobs, "token_weights": token_weights}
    heads: dict[str, LMHead | None] = {}
    for who, h_aux, head_aux, logits_aux in (("teacher", teacher_hidden, teacher_head, teacher_logits),
                                             ("ref", ref_hidden, ref_head, ref_logits)):
        if (h_aux is None) != (head_aux is None):
            raise ValueError(f"`{who}_hidden` and `{who}_head` must be given together")
        heads[who] = None
        if h_aux is None:
            continue
        if logits_aux is not None or (who == "teacher" and teacher_topk is not None):
            raise ValueError(f"give one source for the {who}: `{who}_logits`, `{who}_hidden` + `{who}_head`"
                             + (" or `teacher_topk`" if who == "teacher" else ""))
        aux_head = _as_head(f"{who}_head", head_aux, f"{who}_hidden", h_aux)
        if aux_head.vocab != V:
            raise ValueError(f"`{who}_head` gives logits over {aux_head.vocab} tokens but the student's lm_head has "
                             f"{V}: the {who} model must share the student's vocabulary (for a head padded to "
                             f"another size with the same tokenizer, pass LMHead.on_vocab({V}))")
        if tuple(h_aux.shape[:-1]) != positions:
            raise ValueError(f"`{who}_hidden` has shape {tuple(h_aux.shape)}, expected {positions + ('H',)}")
        heads[who] = aux_head
        # A zero-stride stand-in lets the shared validator see the [..., V] shape without memory.
        given[f"{who}_logits"] = torch.zeros((), device=h_aux.device).expand(positions + (V,))
    if teacher_topk is not None:
        if teacher_logits is not None:
            raise ValueError("give one source for the teacher: `teacher_logits`, `teacher_hidden` + "
                             "`teacher_head` or `teacher_topk`")
        if not isinstance(teacher_topk, TeacherTopK):
            raise ValueError(f"`teacher_topk` must be a TeacherTopK, got {type(teacher_topk).__name__}")
        given["teacher_logits"] = torch.zeros((), device=hidden.device).expand(positions + (V,))
    sup = supervised_rows(objective, labels, V, given, ignore_index=ignore_index)
    mask, flat = sup.mask, sup.flat
    if teacher_topk is not None:
        check_teacher_topk(teacher_topk, positions, V, tail=teacher_tail, mask=mask)
    if check_finite:
        for name, value in (("hidden", hidden), ("lm_head weight", head.weight), ("lm_head bias", head.bias),
                            ("teacher_hidden", teacher_hidden), ("teacher_head weight", _weight(heads["teacher"])),
                            ("ref_hidden", ref_hidden), ("ref_head weight", _weight(heads["ref"]))):
            if value is not None:
                _check_finite(name, value.detach())

    device_type = hidden.device.type
    autocast = _autocast_dtype(device_type)
    cdt = autocast or torch.promote_types(hidden.dtype, head.weight.dtype)

    def source(who: str, logits_aux: Tensor | None, h_aux: Tensor | None) -> AuxSource | None:
        if logits_aux is not None:
            if check_finite:
                assert_finite(f"{who}_logits", logits_aux.detach(), allow_neg_inf=True)
            return AuxSource(logits=logits_aux.detach().reshape(-1, V))  # [N, V] view; rows gathered per chunk
        if h_aux is not None:
            aux_head = heads[who].detached()
            aux_dtype = autocast or torch.promote_types(h_aux.dtype, aux_head.weight.dtype)
            aux_head = replace(aux_head, weight=aux_head.weight.to(aux_dtype),
                               bias=None if aux_head.bias is None else aux_head.bias.to(aux_dtype))
            return AuxSource(hidden=h_aux.detach().reshape(-1, h_aux.shape[-1]), head=aux_head,
                             compute_dtype=aux_dtype)
        if who == "teacher" and teacher_topk is not None:
            return AuxSource(topk=teacher_topk.flatten().index(flat), tail=teacher_tail)
        return None

    plan = _ChunkPlan(
        objective=objective,
        rows=sup.rows,
        labels=sup.labels,
        weights=apply_loss_weights(reduction_weights(mask, reduction, normalizer).reshape(-1)[flat], loss_weights, sup),
        compute_dtype=cdt,
        logit_scale=float(head.logit_scale),
        softcap=None if head.softcap is None else float(head.softcap),
        chunk=0,
        metrics=metrics,
        teacher=source("teacher", teacher_logits, teacher_hidden),
        ref=source("ref", ref_logits, ref_hidden),
        old_logprobs=sup.pick(old_logprobs),
        token_weights=sup.pick(token_weights),
        kernel=select_kernel(objective, device_type)[1],
    )
    plan.chunk = resolve_chunk_size(chunk_size, V, int(plan.teacher is not None) + int(plan.ref is not None),
                                    memory_budget)

    h_flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H] view; supervised rows are gathered per chunk
    weight, bias = head.weight, head.bias
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        sink: dict = {}
        loss, per_rows = _FusedLoss.apply(h_flat, weight, bias, plan,
                                          "recompute" if mode == "recompute" else "forward", sink)
        result_metrics = sink["metrics"]
    else:
        with torch.no_grad(), _no_autocast(device_type):
            out = _run_chunks(plan, h_flat, weight, bias, grad_hidden=False,
                              grad_weight=False, grad_bias=False, collect=True)
        loss, per_rows, result_metrics = out.loss, out.per_token, out.metrics
    per_token = torch.zeros(flat.shape, dtype=torch.float32, device=hidden.device)
    per_token = per_token.masked_scatter(flat, per_rows).reshape(positions)
    return LossResult(loss=loss, per_token=per_token, metrics=result_metrics)


def _check_finite(name: str, value: Tensor) -> None:
    """NaN / inf in `value` is an error. One reduction pass (NaN propagates through min and max) and
    one host sync; the full check, which counts the bad values for the message, runs only on failure."""
    if value.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(value))).all()):
        assert_finite(name, value)


def _weight(head: LMHead | None) -> Tensor | None:
    return None if head is None else head.weight
