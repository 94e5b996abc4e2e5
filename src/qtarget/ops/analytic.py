"""Closed-form chunk math: loss, metrics and the logit gradient of the catalogue's objectives without
autograd over the `[c, V]` chunk.

Every objective of SPEC §2 has a logit gradient of the form (SPEC §1, all coefficients detached)

    dL/dz = alpha * p - beta * delta_y - sum_j lam_j * pi_j          alpha, beta, lam_j: [c]

(e.g. sft: alpha = beta = 1; dft: alpha = beta = sg(p_y); target: alpha = 1, beta = gamma,
lam = 1 - gamma, pi = pi_tilde; sft_kl: alpha = 1 + lam, beta = 1, lam, pi_ref; gem: alpha = 0,
beta = 1, lam = -1, pi = q). A `ClosedForm` states those coefficients together with the per-token
loss value, gamma and extra metrics; the engine then writes the gradient into the softmax buffer in
place (one scale, one fused multiply-add per auxiliary distribution, one scatter at the labels).

The chunk statistics come from three row-wise kernels over the logits (max with argmax, softmax,
one batched dot product for the entropy): the max row holds p = 1/S exactly, so
lse = max - log p_max without a separate log-sum-exp pass, and log p_y = z_y - lse is never rounded
through p (no underflow for unlikely labels).

Which objectives have a closed form is decided by the objective's own `terms` function (a subclass
that overrides `terms` falls back to autograd), so user objectives stay exact through the generic
path in chunked.py.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qtarget.objectives.base import TokenInputs
from qtarget.objectives.catalog import (
    ASFT,
    DFT,
    EAFT,
    GEM,
    PSFT,
    SFT,
    SFTKL,
    DistillHybrid,
    ProFit,
    Prob,
    TargetObjective,
    TokenWeighted,
)
from qtarget.objectives.catalog_2026 import DEFT, ProbMasked, WeightedNLL
from qtarget.objectives.catalog_2027 import SEDSFT
from qtarget.objectives.rules import GeometricMixResidual, TeacherResidual, topk_entropy_ratio
from qtarget.ops.workspace import Workspace, scratch


@dataclass
class ChunkStats:
    """Row statistics of one chunk of float logits z [c, V] (detached)."""

    p: Tensor  # [c, V] softmax(z), a buffer the caller owns (the gradient is written into it)
    lse: Tensor  # [c] log-sum-exp
    logp_y: Tensor  # [c] z_y - lse
    top1: Tensor  # [c] float, 1 where the label attains the row's maximum (argmax == label)
    entropy: Tensor | None  # [c] -sum p log p = lse - sum p z, or None when not asked for


def chunk_stats(z: Tensor, labels: Tensor, entropy: bool = True, shift: bool = False,
                workspace: Workspace | None = None) -> ChunkStats:
    """Statistics of the float logits z [c, V] (float32 or float64) at labels [c]; p goes into the
    workspace's buffer "p" (a fresh tensor without a workspace).

    shift=True first subtracts each row's maximum from z in place (one more pass; z must be a
    buffer the caller owns), and `lse` is then that of the shifted logits: sums over the vocabulary
    weighted by z (cross-entropies, KLs) keep an absolute error of eps * |log p| instead of
    eps * |z|, which matters for losses that are small differences of such sums."""
    top, arg = z.max(dim=-1)
    if shift:
        z.sub_(top.unsqueeze(-1))
    p = softmax_into(z, scratch(workspace, "p", z))
    log_s = -p.gather(-1, arg.unsqueeze(-1)).squeeze(-1).log()  # p at the max is exactly 1 / S
    z_y = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if shift:
        lse, logp_y = log_s, z_y - log_s
    else:  # (z_y - max) is exact or rounded relative to its own size; log p_y never goes through p
        lse, logp_y = top + log_s, (z_y - top) - log_s
    ent = None
    if entropy:
        ent = lse - _dot(p, z, workspace)
    return ChunkStats(p=p, lse=lse, logp_y=logp_y, top1=(arg == labels).to(z.dtype), entropy=ent)


@dataclass
class ClosedForm:
    """One objective on one chunk: per-token loss [c], gamma [c], extras {name: [c]} and the
    gradient coefficients (see the module docstring); `aux` holds (lam [c], pi [c, V]) pairs with pi
    a probability buffer the engine may overwrite."""

    loss: Tensor
    gamma: Tensor
    alpha: Tensor | float
    beta: Tensor | float
    aux: list[tuple[Tensor | float, Tensor]] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)


def _sft(obj, x, s):
    return ClosedForm(loss=-s.logp_y, gamma=torch.ones_like(s.logp_y), alpha=1.0, beta=1.0)


def _label_weighted(w: Tensor, s: ChunkStats, extras: dict | None = None) -> ClosedForm:
    """-w log p_y with a detached w [c]: dL/dz = w (p - delta_y)."""
    return ClosedForm(loss=-w * s.logp_y, gamma=w, alpha=w, beta=w, extras=extras or {})


def _dft(obj, x, s):
    return _label_weighted(x.p_y_detached, s)


def _prob(obj, x, s):
    a = obj.params["alpha"]
    p_pow = torch.exp(a * s.logp_y)  # d(1 - p_y^a)/a / dz = p_y^a (p - delta_y)
    return ClosedForm(loss=(1.0 - p_pow) / a, gamma=p_pow, alpha=p_pow, beta=p_pow)


def _profit(obj, x, s):
    return _label_weighted((x.p_y_detached > obj.params["tau"]).to(s.logp_y.dtype), s)


def _eaft(obj, x, s):
    return _label_weighted(topk_entropy_ratio(x.logp, obj.params["k"]).pow(obj.params["alpha"]), s)


def _token_weighted(obj, x, s):
    return _label_weighted(x.require("token_weights").to(s.logp_y.dtype), s)


def _psft(obj, x, s):
    upper = 1.0 + obj.params["eps"]
    log_ratio = s.logp_y - x.require("old_logprobs").to(s.logp_y.dtype)
    ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
    clipped = ratio > upper
    # -r has gradient r (p - delta_y) where r is not clipped and the clamp passes the gradient
    active = ~clipped & (log_ratio >= -20.0) & (log_ratio <= 20.0)
    coef = torch.where(active, ratio, torch.zeros_like(ratio))
    return ClosedForm(loss=-torch.where(clipped, torch.full_like(ratio, upper), ratio),
                      gamma=torch.where(clipped, torch.zeros_like(ratio), ratio), alpha=coef, beta=coef,
                      extras={"clip_frac": clipped.to(ratio.dtype), "ratio": ratio})


def _sft_kl(obj, x, s):
    lam = obj.params["lam"]
    kl, q = kl_from_logits(x, s, "ref", shift=True)
    return ClosedForm(loss=-s.logp_y + lam * kl, gamma=torch.full_like(s.logp_y, 1.0 / (1.0 + lam)),
                      alpha=1.0 + lam, beta=1.0, aux=[(lam, q)])


def _asft(obj, x, s):
    lam, p_y = obj.params["lam"], x.p_y_detached
    kl, q = kl_from_logits(x, s, "ref", shift=True)
    gamma = p_y / (p_y + lam) if lam > 0 else torch.ones_like(p_y)
    return ClosedForm(loss=-p_y * s.logp_y + lam * kl, gamma=gamma, alpha=p_y + lam, beta=p_y, aux=[(lam, q)])


def _distill_hybrid(obj, x, s):
    lam = obj.params["lam"]
    kl, q = kl_from_logits(x, s, "teacher", obj._teacher.params["temperature"], shift=True)
    return ClosedForm(loss=-(1.0 - lam) * s.logp_y + lam * kl, gamma=torch.full_like(s.logp_y, 1.0 - lam),
                      alpha=1.0, beta=1.0 - lam, aux=[(lam, q)])


# Row blocks of the vocabulary sums on CPU: ~4 MiB per [rows, V] block, so the product stays in cache
# between its write and its row sum, instead of a [c, V] scratch buffer written to memory and read back
BLOCK_BYTES = 4 * 2**20


def block_rows(t: Tensor) -> int:
    return max(1, BLOCK_BYTES // (t.shape[-1] * t.element_size()))


def _row_blocks(t: Tensor) -> list[slice]:
    """The row blocks of t [c, V], in order, each of at most `block_rows(t)` rows."""
    c, rows = t.shape[0], block_rows(t)
    return [slice(i, min(c, i + rows)) for i in range(0, c, rows)]


def _block_scratch(workspace: Workspace | None, name: str, t: Tensor) -> Tensor:
    """A scratch buffer for one row block of t (a workspace buffer `name` when there is a workspace)."""
    return scratch(workspace, name, t[: block_rows(t)])


def _dot(a: Tensor, b: Tensor, workspace: Workspace | None = None) -> Tensor:
    """[c] row-wise sum of a * b for [c, V] tensors. On CPU, row block by row block through a small
    scratch that stays in cache (12 vs 19 ms for a product into a [c, V] scratch and a row sum at
    c = 904, V = 49,152, two threads; a batched dot product, whose [1, V] x [V, 1] GEMMs run far below
    the memory bandwidth, took 25 ms). Elsewhere the product goes into one [c, V] scratch buffer."""
    return _row_sum_of_products(a, b, None, workspace)


def _row_sum_of_products(a: Tensor, b: Tensor, minus: Tensor | None, workspace: Workspace | None) -> Tensor:
    """[c] sum_v a * (b - minus) (or a * b when `minus` is None), blocked on CPU as in `_dot`."""
    if a.device.type != "cpu":
        buf = scratch(workspace, "dot", a)
        prod = torch.sub(b, minus, out=buf).mul_(a) if minus is not None else torch.mul(a, b, out=buf)
        return prod.sum(-1)
    buf = _block_scratch(workspace, "dot_block", a)
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for sl in _row_blocks(a):
        blk = buf[: sl.stop - sl.start]
        if minus is not None:
            torch.sub(b[sl], minus[sl], out=blk).mul_(a[sl])
        else:
            torch.mul(a[sl], b[sl], out=blk)
        torch.sum(blk, -1, out=out[sl])
    return out


def _workspace_of(x: TokenInputs) -> Workspace | None:
    """The chunk's workspace (ops/workspace.py) that `seeded_inputs` put on `x`, if any."""
    return x.__dict__.get("_workspace")


def _scratch(x: TokenInputs, name: str, like: Tensor) -> Tensor:
    """A [c, V] buffer like `like` from the chunk's workspace, if it has one."""
    return scratch(_workspace_of(x), name, like)


@dataclass
class AuxDist:
    """An auxiliary (teacher or reference) distribution on one chunk: `a` [c, V] its logits divided
    by the temperature (minus the row maxima when `shifted`; -inf replaced by the dtype's lowest
    finite value, so dot products with q stay finite), q = softmax(a) and lse(a) formed on first use."""

    a: Tensor
    shifted: bool
    workspace: Workspace | None  # not the TokenInputs: no reference cycle keeping [c, V] tensors alive
    name: str
    _q: Tensor | None = None
    _lse: Tensor | None = None

    @property
    def q(self) -> Tensor:
        if self._q is None:
            self._q = softmax_into(self.a, scratch(self.workspace, f"{self.name}_q", self.a))
        return self._q

    @property
    def q_formed(self) -> bool:
        """Whether something has formed q already (reading `q` forms it)."""
        return self._q is not None

    @property
    def lse(self) -> Tensor:
        if self._lse is None:  # q's largest entry, at the row's max, is exactly 1 / S
            log_s = -self.q.amax(dim=-1).log()
            self._lse = log_s if self.shifted else self.a.amax(dim=-1) + log_s
        return self._lse


def aux_dist(x: TokenInputs, who: str, temperature: float = 1.0, shift: bool = False) -> AuxDist:
    """The teacher's or reference's distribution at `temperature` (see AuxDist); `shift` subtracts
    the row maxima (for the accuracy of KL losses, as in `chunk_stats`). Cached on `x`: the objective
    and the metrics share it (the first call decides the shift). The given logits are never written
    to; a transformed copy goes into a workspace buffer."""
    key = f"_aux_{who}_{temperature!r}"
    if key not in x.__dict__:
        a = x.require(who)
        name = f"{who}_{temperature!r}"
        finite = x.__dict__.get(f"_finite_{who}", False)
        if temperature != 1.0 or shift or not finite:
            own = _scratch(x, f"{name}_a", a)
            src = torch.div(a, temperature, out=own) if temperature != 1.0 else a
            if shift:
                src = torch.sub(src, src.amax(dim=-1, keepdim=True), out=own)
            if not finite:
                src = torch.clamp(src, min=torch.finfo(own.dtype).min, out=own)
            a = own
        x.__dict__[key] = AuxDist(a=a, shifted=shift, workspace=_workspace_of(x), name=name)
    return x.__dict__[key]


def kl_from_logits(x: TokenInputs, s: ChunkStats, who: str, temperature: float = 1.0,
                   shift: bool = False) -> tuple[Tensor, Tensor]:
    """(KL(q || p) [c], q [c, V]) with q = softmax(aux logits / temperature):
    sum q (log q - log p) = sum q (a - z) - lse(a) + lse(z) (sum q = 1 to rounding). The difference
    a - z is formed first (one pass): a teacher or reference close to the student has small a - z,
    so its small KL keeps its relative accuracy (two separate sums q a and q z would each carry an
    error of eps * max |logit| times the accumulation length's growth). Cached on `x` (the objective's
    KL term and the KL metric are one computation)."""
    d = aux_dist(x, who, temperature, shift)
    key = f"_kl_{who}_{temperature!r}"
    if key not in x.__dict__:
        x.__dict__[key] = _row_sum_of_products(d.q, d.a, x.logits, _workspace_of(x)) - (d.lse - s.lse)
    return x.__dict__[key], d.q


def kl_only(x: TokenInputs, s: ChunkStats, who: str, temperature: float = 1.0) -> Tensor:
    """KL(q || p) [c] as in `kl_from_logits`, for a reader that needs only the KL (the metric). When
    nothing has formed q (target_sft's mixture reads the teacher's logits, not its softmax), the CPU
    computes it row block by row block in cache (`_kl_in_blocks`): no [c, V] q buffer, and the
    teacher's and student's logits are each read from memory once."""
    key = f"_kl_{who}_{temperature!r}"
    d = aux_dist(x, who, temperature)
    if key not in x.__dict__ and not d.q_formed and d.a.device.type == "cpu":
        x.__dict__[key] = _kl_in_blocks(d.a, x.logits, s.lse, _workspace_of(x))
    return kl_from_logits(x, s, who, temperature)[0] if key not in x.__dict__ else x.__dict__[key]


def _kl_in_blocks(a: Tensor, z: Tensor, lse_z: Tensor, workspace: Workspace | None) -> Tensor:
    """[c] KL(softmax(a) || softmax(z)) = sum_v e (a - z) / S - (m + log S - lse_z), with m the row max
    of a, e = exp(a - m) and S = sum e, block by block through two small scratch buffers."""
    e_buf, d_buf = _block_scratch(workspace, "kl_e", a), _block_scratch(workspace, "dot_block", a)
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for sl in _row_blocks(a):
        a_b, n = a[sl], sl.stop - sl.start
        m = a_b.amax(dim=-1, keepdim=True)
        e = torch.sub(a_b, m, out=e_buf[:n]).exp_()
        total = e.sum(-1)
        dot = torch.sub(a_b, z[sl], out=d_buf[:n]).mul_(e).sum(-1)
        out[sl] = dot / total - (m.squeeze(-1) + total.log() - lse_z[sl])
    return out


def _cross_entropy(pi: Tensor, s: ChunkStats, x: TokenInputs, normalized: bool = False,
                   pi_dot_z: Tensor | None = None) -> Tensor:
    """[c] CE(pi, p) = -sum pi log p. From log p when a rule already formed it (no cancellation
    between lse and sum pi z), else as lse * sum pi - sum pi z without forming log p (`pi_dot_z`:
    sum pi z when the caller formed it with pi); `normalized` (pi from a softmax: sum pi = 1 to
    rounding) skips the sum."""
    if "logp" in x.__dict__:
        return -_dot(pi, x.logp, _workspace_of(x))
    dot = pi_dot_z if pi_dot_z is not None else _dot(pi, x.logits, _workspace_of(x))
    return (s.lse if normalized else s.lse * pi.sum(-1)) - dot


def _gem(obj, x, s):
    q = torch.div(x.logp, obj.params["beta"], out=_scratch(x, "gem_q", x.logits))
    q = softmax_into(q, q)  # q ∝ sg(p)^(1/beta); gradient q - delta_y
    loss = -s.logp_y - _cross_entropy(q, s, x)
    return ClosedForm(loss=loss, gamma=torch.ones_like(s.logp_y), alpha=0.0, beta=1.0, aux=[(-1.0, q)])


def residual_probs(rule, x: TokenInputs) -> tuple[Tensor, bool, Tensor | None]:
    """(pi_tilde [c, V] of a residual rule, whether it came from a softmax, sum_v pi_tilde z [c] when
    it was formed along the way, else None). The teacher and
    geometric-mix residuals are formed from logits (softmax(t / T); softmax((1 - eta) z + eta t), the
    same distribution as the rule's log_softmax((1 - eta) log p + eta log pi_T)) without
    log-softmaxes of student and teacher."""
    if type(rule) is TeacherResidual:
        return aux_dist(x, "teacher", rule.params["temperature"]).q, True, None
    if type(rule) is GeometricMixResidual and rule.params["eta"] > 0.0:
        t = aux_dist(x, "teacher").a
        mix = _scratch(x, "mix", t)
        if t.device.type == "cpu":
            pi, pi_dot_z = _geometric_mix_in_blocks(x.logits, t, rule.params["eta"], mix, _workspace_of(x))
            return pi, True, pi_dot_z
        return softmax_into(torch.lerp(x.logits, t, rule.params["eta"], out=mix), mix), True, None
    return rule.log_probs(x).exp(), False, None


def _geometric_mix_in_blocks(z: Tensor, t: Tensor, eta: float, out: Tensor,
                             workspace: Workspace | None) -> tuple[Tensor, Tensor]:
    """(pi, sum_v pi z [c]) with pi = softmax(lerp(z, t, eta)) written into `out`, row block by row block
    (CPU): the mixed logits and the product for sum_v pi z live in a cache-sized scratch, so z and t are
    read from memory once and pi written once (instead of a lerp, a softmax and a dot product each going
    through memory)."""
    tmp = _block_scratch(workspace, "dot_block", z)
    dot = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    for sl in _row_blocks(z):
        blk = tmp[: sl.stop - sl.start]
        softmax_into(torch.lerp(z[sl], t[sl], eta, out=blk), out[sl])
        torch.sum(torch.mul(out[sl], z[sl], out=blk), -1, out=dot[sl])
    return out, dot


def softmax_into(t: Tensor, out: Tensor) -> Tensor:
    """softmax of `t` over the last dim written into `out` (may be `t` itself; a buffer the caller
    owns), returned."""
    try:
        return torch._softmax(t, -1, False, out=out)
    except (RuntimeError, TypeError):  # an out= variant this build or device lacks
        return out.copy_(torch.softmax(t, dim=-1))


def _target(obj, x, s):
    gamma = obj.gamma_rule(x)
    pi, normalized, pi_dot_z = residual_probs(obj.residual_rule, x)
    loss = -gamma * s.logp_y + (1.0 - gamma) * _cross_entropy(pi, s, x, normalized, pi_dot_z)
    return ClosedForm(loss=loss, gamma=gamma, alpha=1.0, beta=gamma, aux=[(1.0 - gamma, pi)])


def _weighted_nll(obj, x, s):
    return _label_weighted(obj.weight_rule(x).detach(), s)


def _prob_masked(obj, x, s):
    p_y = x.p_y_detached  # d mask (1 - p_y) / dz = mask p_y (p - delta_y)
    keep = (p_y >= obj.params["q"]) if obj.params["side"] == "above" else (p_y <= obj.params["q"])
    coef = keep.to(p_y.dtype) * p_y
    return ClosedForm(loss=keep.to(p_y.dtype) * (1.0 - p_y), gamma=coef, alpha=coef, beta=coef)


def _deft(obj, x, s):
    # a = sg(sum p^2); d (1 - p_y^a) / (a + eps) / dz = a / (a + eps) p_y^a (p - delta_y)
    a = _dot(s.p, s.p, _workspace_of(x)) if type(obj).concentration is DEFT.concentration else obj.concentration(x).detach()
    p_pow = torch.exp(a * s.logp_y)
    coef = a / (a + obj.eps) * p_pow
    return ClosedForm(loss=(1.0 - p_pow) / (a + obj.eps), gamma=coef, alpha=coef, beta=coef,
                      extras={"concentration": a})


def _sed_sft(obj, x, s):
    # -log p_y + scale m (p_y (p_y - 1) + 1/4): dL/dz = c (p - delta_y), c = 1 - scale m p_y (2 p_y - 1)
    m = obj.selected(x)
    p_y = s.logp_y.exp()
    scaled = obj.params["scale"] * m
    coef = 1.0 - scaled * p_y * (2.0 * p_y - 1.0)
    return ClosedForm(loss=-s.logp_y + scaled * (p_y * (p_y - 1.0) + 0.25), gamma=torch.ones_like(p_y),
                      alpha=coef, beta=coef, extras={"selected": m})


# keyed by the `terms` function the closed form restates: an override of `terms` is not matched
CLOSED_FORMS: dict[Callable, Callable[[object, TokenInputs, ChunkStats], ClosedForm]] = {
    SFT.terms: _sft, DFT.terms: _dft, Prob.terms: _prob, ProFit.terms: _profit, EAFT.terms: _eaft,
    TokenWeighted.terms: _token_weighted, PSFT.terms: _psft, SFTKL.terms: _sft_kl, ASFT.terms: _asft,
    DistillHybrid.terms: _distill_hybrid, GEM.terms: _gem, TargetObjective.terms: _target,
    WeightedNLL.terms: _weighted_nll, ProbMasked.terms: _prob_masked, DEFT.terms: _deft, SEDSFT.terms: _sed_sft,
}


# closed forms whose loss sums over the vocabulary (cross-entropies, KLs): shifted logits (chunk_stats)
SHIFTED = {SFTKL.terms, ASFT.terms, DistillHybrid.terms, GEM.terms, TargetObjective.terms}


def closed_form_of(objective) -> Callable | None:
    """The closed form of `objective`'s terms, or None (autograd over the chunk is then used)."""
    return CLOSED_FORMS.get(type(objective).terms)


def needs_shift(objective) -> bool:
    return type(objective).terms in SHIFTED


def seeded_inputs(z: Tensor, s: ChunkStats, finite_aux: tuple[str, ...] = (), workspace: Workspace | None = None,
                  **aux) -> TokenInputs:
    """TokenInputs on the detached logits with the statistics already known filled in, so rules and
    metrics read them instead of recomputing (log p is still formed on demand). `finite_aux` names
    the auxiliary logits known to hold no -inf (formed from hidden states); `workspace` provides the
    chunk's [c, V] buffers."""
    x = TokenInputs(logits=z, **aux)
    x.__dict__["_workspace"] = workspace
    x.__dict__["logp_y"] = s.logp_y
    x.__dict__["p_y_detached"] = s.logp_y.exp()
    x.__dict__["p_detached"] = s.p  # valid until the gradient is written into it (after the form and metrics)
    for who in finite_aux:
        x.__dict__[f"_finite_{who}"] = True
    return x


def write_gradient(s: ChunkStats, form: ClosedForm, labels: Tensor, weights: Tensor, out: Tensor) -> Tensor:
    """dL/dz for L = sum_rows weights * loss, written into `out` [c, V] (the logits' own buffer:
    nothing reads them once the loss and metrics are formed; may also be s.p): weights * (alpha p -
    sum_j lam_j pi_j) and -weights * beta at the labels."""
    coef = weights * form.alpha if isinstance(form.alpha, Tensor) else weights * float(form.alpha)
    g = torch.mul(s.p, coef.unsqueeze(-1), out=out)
    for lam, pi in form.aux:
        g.addcmul_(pi, (weights * lam).unsqueeze(-1), value=-1.0)
    beta = weights * form.beta
    g.scatter_add_(-1, labels.unsqueeze(-1), -beta.to(g.dtype).unsqueeze(-1))
    return g


def closed_form_metrics(x: TokenInputs, s: ChunkStats, form: ClosedForm, teacher_temperature: float) -> dict[str, Tensor]:
    """The values of `token_metrics` from the chunk statistics (same keys, same definitions)."""
    out = {
        "nll": -s.logp_y,
        "p_y": x.p_y_detached,
        "entropy": s.entropy,
        "gamma": form.gamma.detach().to(torch.float32),
        "top1": s.top1.to(torch.float32),
    }
    if x.ref_logits is not None:
        out["kl_ref"] = kl_only(x, s, "ref")
    if x.teacher_logits is not None:
        out["kl_teacher"] = kl_only(x, s, "teacher", teacher_temperature)
    for key, value in form.extras.items():
        out[key] = value.detach().to(torch.float32)
    return out
