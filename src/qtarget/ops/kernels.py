"""The per-chunk work after the logits GEMM, three ways, and the choice between them.

A kernel takes one chunk's float logits z [c, V] (detached; a buffer it may overwrite), its
auxiliary inputs (never written to), reduction weights [c] and optionally the call's `Workspace`
(ops/workspace.py: the chunk's [c, V] temporaries reuse its buffers), and returns a `ChunkStep`: the per-token loss, the weighted loss sum, the logit gradient
dL/dz [c, V] (when asked for) and the per-token metrics (when asked for).

- "autograd": the objective's own `terms` and `torch.autograd.grad` over the chunk. Works for every
  objective, user ones included; the reference for the two below.
- "closed_form": the gradient alpha p - beta delta_y - sum lam pi written in place into the softmax
  buffer (ops/analytic.py); the catalogue's objectives and any `target(gamma, residual)`.
- "compiled": sft, dft and target_sft each as one `torch.compile`d function (Inductor: C++/OpenMP on
  CPU, Triton on CUDA) with dynamic row counts, so ragged last chunks and changing batch sizes reuse
  one graph.

Selection (`select_kernel`, logged once per choice on the "qtarget.ops" logger): the compiled kernel
on CUDA for sft/dft/target_sft, the closed form for the other catalogue objectives and on CPU,
autograd for the rest. Environment: QTARGET_COMPILE=0 never compiles, =1 compiles on CPU too
(opt-in there: compiling takes about a minute per kernel, and on this project's shared 2-core CPU the
compiled sft/dft kernel measured no faster than the closed form; see docs/engine.md);
QTARGET_CLOSED_FORM=0 forces autograd everywhere (debugging, reference timing).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qtarget.objectives.base import Objective, TokenInputs
from qtarget.objectives.catalog import DFT, SFT, TargetObjective
from qtarget.objectives.rules import GeometricMixResidual, LabelProbGamma
from qtarget.objectives.metrics import token_metrics
from qtarget.ops.analytic import (
    chunk_stats,
    closed_form_metrics,
    closed_form_of,
    needs_shift,
    seeded_inputs,
    write_gradient,
)
from qtarget.ops.workspace import Workspace

COMPILE_ENV = "QTARGET_COMPILE"
CLOSED_FORM_ENV = "QTARGET_CLOSED_FORM"
log = logging.getLogger("qtarget.ops")
_logged: set[tuple[str, str]] = set()


@dataclass
class ChunkStep:
    loss: Tensor  # [c] per-token loss, detached
    weighted: Tensor  # [] sum of weights * loss, detached
    grad: Tensor | None  # [c, V] dL/dz of `weighted`
    metrics: dict[str, Tensor] | None  # per-token metric values [c]


Kernel = Callable[..., ChunkStep]


def autograd_step(objective: Objective, z: Tensor, aux: dict, weights: Tensor, *, want_grad: bool,
                  metrics: bool, finite_aux: tuple[str, ...] = (), workspace: Workspace | None = None) -> ChunkStep:
    z = z.detach().requires_grad_(want_grad)
    x = TokenInputs(logits=z, **aux)
    with torch.enable_grad() if want_grad else torch.no_grad():
        terms = objective.terms(x)
        if tuple(terms.loss.shape) != (z.shape[0],):
            raise ValueError(f"objective {objective.name!r} returned a per-token loss of shape "
                             f"{tuple(terms.loss.shape)}, expected [{z.shape[0]}]")
        weighted = (terms.loss * weights.to(terms.loss.dtype)).sum()
    g = None
    if want_grad:
        if weighted.requires_grad:
            (g,) = torch.autograd.grad(weighted, z, allow_unused=True)
        if g is None:  # the loss does not depend on these logits (e.g. every token clipped)
            g = torch.zeros_like(z)
    values = token_metrics(x, terms, objective.teacher_temperature) if metrics else None
    return ChunkStep(terms.loss.detach(), weighted.detach(), g, values)


def closed_form_step(objective: Objective, z: Tensor, aux: dict, weights: Tensor, *, want_grad: bool,
                     metrics: bool, finite_aux: tuple[str, ...] = (), workspace: Workspace | None = None) -> ChunkStep:
    """The closed form (ops/analytic.py); the gradient is written back into z's own buffer."""
    with torch.no_grad():
        z = z.detach()
        s = chunk_stats(z, aux["labels"], entropy=metrics, shift=needs_shift(objective), workspace=workspace)
        x = seeded_inputs(z, s, finite_aux, workspace, **aux)
        form = closed_form_of(objective)(objective, x, s)
        w = weights.to(form.loss.dtype)
        weighted = (form.loss * w).sum()
        values = closed_form_metrics(x, s, form, objective.teacher_temperature) if metrics else None
        g = write_gradient(s, form, aux["labels"], w, out=z) if want_grad else None
    return ChunkStep(form.loss, weighted, g, values)


# ------------------------------------------------------------------------------ compiled sft/dft
def label_chunk(z: Tensor, labels: Tensor, weights: Tensor, dft: bool):
    """sft (dft=False) or dft on float logits z [c, V], written for a compiler to fuse: returns the
    logit gradient of sum(weights * loss) [c, V], loss, log p_y, p_y, top1, entropy [c]."""
    top, arg = z.max(dim=-1)
    e = torch.exp(z - top.unsqueeze(-1))
    total = e.sum(-1)
    lse = top + total.log()
    p = e / total.unsqueeze(-1)
    logp_y = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    p_y = logp_y.exp()
    entropy = lse - (p * z).sum(-1)
    coef = weights * p_y if dft else weights
    at_label = labels.unsqueeze(-1) == torch.arange(z.shape[-1], device=z.device)
    g = p * coef.unsqueeze(-1) - torch.where(at_label, coef.unsqueeze(-1), torch.zeros_like(p))
    loss = -p_y * logp_y if dft else -logp_y
    return g, loss, logp_y, p_y, (arg == labels).to(z.dtype), entropy


def target_sft_chunk(z: Tensor, t: Tensor, labels: Tensor, weights: Tensor, eta: float):
    """target_sft (gamma = sg(p_y), pi_tilde = softmax((1 - eta) z + eta t), 0 < eta <= 1) on float
    logits z and teacher logits t [c, V], written for a compiler to fuse: returns the logit gradient
    of sum(weights * loss), loss, log p_y, p_y, top1, entropy, KL(pi_T || p) [c]."""
    top, arg = z.max(dim=-1)
    zs = z - top.unsqueeze(-1)
    e = torch.exp(zs)
    total = e.sum(-1)
    lse = total.log()  # of the shifted logits, as in analytic.chunk_stats(shift=True)
    p = e / total.unsqueeze(-1)
    logp_y = zs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    p_y = logp_y.exp()
    t = t.clamp_min(torch.finfo(t.dtype).min)  # -inf (probability 0) stays 0 in the sums below
    ts = t - t.max(dim=-1).values.unsqueeze(-1)
    et = torch.exp(ts)
    total_t = et.sum(-1)
    q = et / total_t.unsqueeze(-1)
    m = torch.lerp(zs, ts, eta)
    em = torch.exp(m - m.max(dim=-1).values.unsqueeze(-1))
    pi = em / em.sum(-1).unsqueeze(-1)
    entropy = lse - (p * zs).sum(-1)
    cross_entropy = lse - (pi * zs).sum(-1)
    kl_teacher = (q * (ts - zs)).sum(-1) - (total_t.log() - lse)
    loss = -p_y * logp_y + (1.0 - p_y) * cross_entropy
    at_label = labels.unsqueeze(-1) == torch.arange(z.shape[-1], device=z.device)
    w = weights.unsqueeze(-1)
    g = w * (p - (1.0 - p_y).unsqueeze(-1) * pi) - torch.where(at_label, w * p_y.unsqueeze(-1), torch.zeros_like(p))
    return g, loss, logp_y, p_y, (arg == labels).to(z.dtype), entropy, kl_teacher


_compiled: dict[str, Callable] = {}


def _compiled_fn(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


def compiled_label_chunk() -> Callable:
    return _compiled_fn("label", label_chunk)


def is_compiled_target_sft(objective: Objective) -> bool:
    """target(gamma = p_y, geometric-mix residual with eta > 0), i.e. target_sft: the compiled kernel's."""
    return (type(objective).terms is TargetObjective.terms and type(objective.gamma_rule) is LabelProbGamma
            and type(objective.residual_rule) is GeometricMixResidual and objective.residual_rule.params["eta"] > 0)


def compiled_step(objective: Objective, z: Tensor, aux: dict, weights: Tensor, *, want_grad: bool,
                  metrics: bool, finite_aux: tuple[str, ...] = (), workspace: Workspace | None = None) -> ChunkStep:
    dft = type(objective).terms is DFT.terms
    target = is_compiled_target_sft(objective)
    with torch.no_grad():
        try:
            if target:
                g, loss, logp_y, p_y, top1, entropy, kl = _compiled_fn("target_sft", target_sft_chunk)(
                    z.detach(), aux["teacher_logits"], aux["labels"], weights.to(z.dtype),
                    objective.residual_rule.params["eta"])
            else:
                g, loss, logp_y, p_y, top1, entropy = compiled_label_chunk()(
                    z.detach(), aux["labels"], weights.to(z.dtype), dft)
        except Exception as err:  # noqa: BLE001 - no working compiler: fall back for good
            _compile_failed(err)
            return closed_form_step(objective, z, aux, weights, want_grad=want_grad, metrics=metrics,
                                    finite_aux=finite_aux, workspace=workspace)
        values = None
        if metrics:
            gamma = p_y if (dft or target) else torch.ones_like(p_y)
            values = {"nll": -logp_y, "p_y": p_y, "entropy": entropy, "gamma": gamma.float(), "top1": top1.float()}
            if target:
                values["kl_teacher"] = kl
    return ChunkStep(loss, (loss * weights.to(loss.dtype)).sum(), g if want_grad else None, values)


_compile_broken: list[str] = []


def _compile_failed(err: Exception) -> None:
    if not _compile_broken:
        _compile_broken.append(f"{type(err).__name__}: {err}"[:300])
        log.warning("qtarget fused engine: torch.compile failed (%s); using the eager closed-form kernel",
                    _compile_broken[0])


# ------------------------------------------------------------------------------------- choice
def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"environment variable {name} must be 0, 1 or auto, got {os.environ[name]!r}")


def select_kernel(objective: Objective, device_type: str) -> tuple[str, Kernel, str]:
    """(name, kernel, reason) for `objective` on `device_type`; the choice is logged once."""
    name, why = _choose(objective, device_type)
    key = (name, why)
    if key not in _logged:
        _logged.add(key)
        log.info("qtarget fused engine: %s kernel for %s on %s (%s)", name, objective.name, device_type, why)
    return name, {"autograd": autograd_step, "closed_form": closed_form_step, "compiled": compiled_step}[name], why


def _choose(objective: Objective, device_type: str) -> tuple[str, str]:
    if _env_flag(CLOSED_FORM_ENV) is False:
        return "autograd", f"{CLOSED_FORM_ENV}=0"
    if closed_form_of(objective) is None:
        return "autograd", "no closed form for this objective's terms"
    compile_flag = _env_flag(COMPILE_ENV)
    compilable = type(objective).terms in (SFT.terms, DFT.terms) or is_compiled_target_sft(objective)
    if not compilable or compile_flag is False:
        return "closed_form", (f"{COMPILE_ENV}=0" if compilable else "compiled kernels cover sft, dft, target_sft")
    if _compile_broken:
        return "closed_form", "torch.compile failed earlier in this process"
    if compile_flag is None and device_type != "cuda":
        return "closed_form", f"compiling is opt-in off CUDA ({COMPILE_ENV}=1)"
    return "compiled", f"{COMPILE_ENV}={'1' if compile_flag else 'auto'}"
