"""A sparse teacher distribution: the teacher's top-k token ids and log-probs plus the log of the
mass outside them, and how the engine turns it back into a dense log pi_T over the vocabulary.

At one position, with S the k stored ids, pi_T(v) for v in S is stored exactly, and the tail mass
t = 1 - sum_{v in S} pi_T(v) is stored as log t. What happens to t is a stated choice (`TAILS`):

- "renormalize": pi_T restricted to S and renormalised, pi_T'(v) = pi_T(v) / (1 - t) on S, 0 elsewhere.
  Every residual that multiplies by pi_T^eta (geometric mix) is then 0 outside S.
- "student": the tail spread over V \\ S in proportion to the student's own p (a stop-gradient):
  pi_T'(v) = t * sg(p(v)) / sum_{u not in S} sg(p(u)) for v not in S. Defined on all of V, so the
  geometric mix p^(1-eta) pi_T^eta stays positive everywhere. Exact when the teacher's tail has
  the student's shape.
- "uniform": the tail spread evenly, pi_T'(v) = t / (V - k) for v not in S.

With k = V (or t = 0) all three equal the dense teacher.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qtarget.ops.workspace import Workspace, scratch

TAILS = ("renormalize", "student", "uniform")
# |sum_k exp(logprobs) + exp(log_tail) - 1| allowed by `check_teacher_topk` (float32 producers).
MASS_TOLERANCE = 1e-3


@dataclass(eq=False)
class TeacherTopK:
    """A sparse teacher distribution at some positions `[...]`.

    ids       [..., k] int64 token ids in [0, V), distinct per position
    logprobs  [..., k] float32 log pi_T of those ids (at the cache's temperature); -inf allowed
    log_tail  [...]    float32 log(1 - sum_k exp(logprobs)); -inf when the top-k hold all mass
    """

    ids: Tensor
    logprobs: Tensor
    log_tail: Tensor

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def index(self, rows: Tensor) -> "TeacherTopK":
        """The positions `rows` of a flattened [N, ...] TeacherTopK (rows: [n] int64 or bool [N])."""
        return TeacherTopK(self.ids[rows], self.logprobs[rows], self.log_tail[rows])

    def flatten(self) -> "TeacherTopK":
        """[..., k] -> [N, k] and [...] -> [N]."""
        return TeacherTopK(self.ids.reshape(-1, self.k), self.logprobs.reshape(-1, self.k), self.log_tail.reshape(-1))

    def to(self, device: torch.device | str) -> "TeacherTopK":
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device), self.log_tail.to(device))


def check_tail(tail: str) -> str:
    if tail not in TAILS:
        raise ValueError(f"unknown teacher tail {tail!r}; valid: {', '.join(TAILS)}")
    return tail


def _first(bad: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def check_teacher_topk(topk: TeacherTopK, positions: tuple[int, ...], vocab_size: int, *, tail: str,
                       mask: Tensor | None = None) -> None:
    """Raise ValueError naming the field and position if `topk` is not a valid sparse teacher for
    `positions` (the labels' shape) over a vocabulary of `vocab_size`.

    Shapes and dtypes are checked everywhere; values (ids in [0, V), distinct ids, no NaN/+inf,
    log-probs <= 0, sum_k pi + tail = 1 within MASS_TOLERANCE) only where `mask` [positions] is True
    (all positions when None), so unsupervised positions may hold any filler.
    """
    check_tail(tail)
    positions = tuple(int(p) for p in positions)
    ids, logprobs, log_tail = topk.ids, topk.logprobs, topk.log_tail
    if ids.dim() != len(positions) + 1 or tuple(ids.shape[:-1]) != positions:
        raise ValueError(f"teacher top-k `ids` has shape {tuple(ids.shape)}, expected {positions + ('k',)}")
    k = ids.shape[-1]
    if k < 1:
        raise ValueError("teacher top-k `ids` has k = 0: at least one token per position is needed")
    if k > vocab_size:
        raise ValueError(f"teacher top-k has k = {k} ids per position but the vocabulary has only {vocab_size}")
    if tuple(logprobs.shape) != positions + (k,):
        raise ValueError(f"teacher top-k `logprobs` has shape {tuple(logprobs.shape)}, expected {positions + (k,)}")
    if tuple(log_tail.shape) != positions:
        raise ValueError(f"teacher top-k `log_tail` has shape {tuple(log_tail.shape)}, expected {positions}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"teacher top-k `ids` must be an integer tensor, got dtype {ids.dtype}")
    for name, value in (("logprobs", logprobs), ("log_tail", log_tail)):
        if not value.dtype.is_floating_point:
            raise ValueError(f"teacher top-k `{name}` must be a float tensor, got dtype {value.dtype}")
    if mask is not None:
        if tuple(mask.shape) != positions:
            raise ValueError(f"`mask` has shape {tuple(mask.shape)}, expected {positions}")
        ids, logprobs, log_tail = ids[mask], logprobs[mask], log_tail[mask]
        where = mask.nonzero()  # maps a selected row back to its position
    else:
        ids, logprobs, log_tail = ids.reshape(-1, k), logprobs.reshape(-1, k), log_tail.reshape(-1)
        where = None

    def at(row_bad: Tensor) -> tuple[int, ...]:
        row = _first(row_bad)[0]
        if where is not None:
            return tuple(int(i) for i in where[row].tolist())
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(row), positions)) if positions else ()

    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        rows = bad.any(-1)
        value = int(ids[rows][0][bad[rows][0]][0])
        raise ValueError(f"teacher top-k `ids` holds {value} at position {at(rows)}: expected a token id in [0, {vocab_size})")
    ordered = ids.sort(-1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]).any(-1) if k > 1 else torch.zeros_like(ids[:, 0], dtype=torch.bool)
    if bool(dup.any()):
        raise ValueError(f"teacher top-k `ids` repeats a token id at position {at(dup)}: the k ids must be distinct")
    for name, value in (("logprobs", logprobs), ("log_tail", log_tail)):
        bad = torch.isnan(value) | (value == math.inf) | (value > MASS_TOLERANCE)
        bad = bad.reshape(bad.shape[0], -1).any(-1)
        if bool(bad.any()):
            raise ValueError(f"teacher top-k `{name}` is NaN, +inf or > 0 at position {at(bad)}: "
                             f"expected log-probabilities (<= 0, -inf allowed)")
    finite = torch.isfinite(logprobs).any(-1)
    if not bool(finite.all()):
        raise ValueError(f"teacher top-k `logprobs` are all -inf at position {at(~finite)}: the top-k hold no mass")
    mass = logprobs.double().exp().sum(-1) + log_tail.double().exp()
    off = (mass - 1.0).abs() > MASS_TOLERANCE
    if bool(off.any()):
        row = _first(off)[0]
        raise ValueError(f"teacher top-k at position {at(off)}: sum(exp(logprobs)) + exp(log_tail) = "
                         f"{float(mass[row]):.6f}, expected 1 (log_tail must be log(1 - sum of the top-k probabilities))")


@torch.no_grad()
def dense_teacher_logprobs(ids: Tensor, logprobs: Tensor, log_tail: Tensor, student_logits: Tensor,
                           tail: str, workspace: Workspace | None = None, name: str = "teacher") -> Tensor:
    """[c, V] float32 normalised log pi_T' from a sparse teacher (ids/logprobs [c, k], log_tail [c])
    and the chunk's student logits [c, V] (detached; only the "student" tail reads them, never writes).
    Entries with zero probability are -inf. See the module docstring for the tail options. The result
    and one temporary are `workspace` buffers (`name`, `name`_tmp) when a workspace is given."""
    check_tail(tail)
    z = student_logits.detach().to(torch.float32)
    c, V = z.shape
    ids = ids.to(torch.int64)
    lp = logprobs.to(torch.float32)
    log_t = log_tail.to(torch.float32).unsqueeze(-1)
    k = ids.shape[-1]
    out = scratch(workspace, name, z)
    tmp = scratch(workspace, f"{name}_tmp", z)
    if tail == "renormalize" or k == V:
        out.fill_(-math.inf)
    elif tail == "uniform":
        out.copy_((log_t - math.log(V - k)).expand(c, V))
    else:  # "student": log t + z_v - logsumexp_{u not in S} z_u  off S
        log_rest = _logsumexp_destroying(tmp.copy_(z).scatter_(-1, ids, -math.inf))
        torch.sub(z, log_rest - log_t, out=out)
    out.scatter_(-1, ids, lp)
    # renormalise (exact for "renormalize"; removes float32 rounding of sum + tail for the others)
    return out.sub_(_logsumexp_destroying(tmp.copy_(out)))


def _logsumexp_destroying(x: Tensor) -> Tensor:
    """[c, 1] log-sum-exp of the rows of x [c, V], using x itself as the buffer of the exponentials."""
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row of -inf stays -inf
    return x.sub_(top).exp_().sum(dim=-1, keepdim=True).log_().add_(top)


@torch.no_grad()
def topk_from_logits(logits: Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    """The sparse form of softmax(logits / temperature) over the last dim: logits [..., V] ->
    TeacherTopK with ids/logprobs [..., k] and log_tail [...]. The tail is a masked logsumexp of the
    non-top-k log-probs (no cancellation in 1 - sum)."""
    V = logits.shape[-1]
    if not 1 <= int(k) <= V:
        raise ValueError(f"top_k must be in [1, {V}] (the vocabulary size), got {k}")
    if float(temperature) <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits.to(torch.float32) / float(temperature), dim=-1)
    top = logp.topk(int(k), dim=-1)
    if int(k) == V:
        log_tail = torch.full(logp.shape[:-1], -math.inf, dtype=torch.float32, device=logp.device)
    else:
        log_tail = torch.logsumexp(logp.scatter(-1, top.indices, -math.inf), dim=-1)
    return TeacherTopK(ids=top.indices.to(torch.int64), logprobs=top.values.contiguous(), log_tail=log_tail)
