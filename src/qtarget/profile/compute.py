"""The measurement of `qtarget profile`: one no-grad pass of a model over tokenised demonstrations.

For every supervised token y (after the usual shift: the hidden state at t predicts labels[t + 1])
it records p_y, log p_y, the predictive entropy and whether the model's top-1 token is y; with a
teacher (a live model, or the top-k of a teacher cache) also the teacher's p_y, entropy, top-1, the
teacher–student top-1 agreement and KL(teacher ‖ student).

Logits are formed chunk by chunk from the final hidden states and the LM head (`LMHead.logits`: bias,
logit scale and softcap included), `chunk_rows(V, ...)` rows at a time (ops/budget.py), so the
`[N, V]` logits of a batch are never held whatever V is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from qtarget.data.collate import CACHE_ROW, CACHE_SPLIT, Collator
from qtarget.data.tokenize import IGNORE_INDEX
from qtarget.models.head import LMHead, causal_lm_of, lm_head_of
from qtarget.ops.budget import chunk_rows
from qtarget.ops.sparse_teacher import dense_teacher_logprobs

TEACHER_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_log_tail")


@dataclass
class TokenProfile:
    """Per supervised token, in example order (numpy arrays of equal length n)."""

    row: np.ndarray  # [n] int64: index of the example in the profiled list
    position: np.ndarray  # [n] int64: index of the token among its row's supervised tokens
    label: np.ndarray  # [n] int64: the demonstrated token y
    p_y: np.ndarray  # [n] float64
    logp_y: np.ndarray  # [n] float64
    entropy: np.ndarray  # [n] float64 (nats)
    top1: np.ndarray  # [n] bool: argmax p == y
    teacher: dict[str, np.ndarray] = field(default_factory=dict)  # p_y, entropy, top1, agree, kl

    @property
    def tokens(self) -> int:
        return int(self.p_y.size)


def _token_stats(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """p_y, log p_y, entropy and argmax of float logits [c, V] (or normalised log-probs)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    logp_y = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # 0 * log 0 = 0 (rows the head pads with -inf, entries a sparse teacher gives no mass)
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return {"logp": logp, "logp_y": logp_y, "entropy": entropy, "argmax": logp.argmax(-1)}


def _decoder_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    lm = causal_lm_of(model)
    keys = ("input_ids", "attention_mask", "position_ids")
    out = lm.get_decoder()(**{k: batch[k] for k in keys if k in batch}, use_cache=False)
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


@torch.no_grad()
def profile_examples(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    teacher: nn.Module | None = None,
    teacher_cache: Any = None,
    cache_rows: Sequence[int] | None = None,
    cache_split: str = "train",
    teacher_tail: str = "student",
    batch_size: int = 8,
    memory_budget: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> TokenProfile:
    """Profile `model` on tokenised `examples` ({input_ids, labels[, position_ids]}).

    teacher: a live teacher on the student's vocabulary; or teacher_cache (a TeacherCache) with
    `cache_rows[i]` the cache row of examples[i] in `cache_split` (the cache's rows are checked against
    the batch's supervised positions). `on_batch(n_examples)` is called after each batch (progress)."""
    if teacher is not None and teacher_cache is not None:
        raise ValueError("give either a teacher model or a teacher cache, not both")
    if not examples:
        raise ValueError("no examples to profile")
    if teacher_cache is not None and (cache_rows is None or len(cache_rows) != len(examples)):
        raise ValueError("with a teacher cache, cache_rows must give the cache row of every example")
    device = next(causal_lm_of(model).parameters()).device
    head = lm_head_of(model).detached()
    V = head.rows
    t_head: LMHead | None = None
    if teacher is not None:
        t_head = lm_head_of(teacher).detached().on_vocab(V)
    collator = Collator(pad_token_id, teacher_cache=teacher_cache)
    n_aux = int(teacher is not None or teacher_cache is not None)
    chunk = chunk_rows(V, n_aux, memory_budget)
    was_training = [(m, m.training) for m in (model, teacher) if m is not None]
    for m, _ in was_training:
        m.eval()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("row", "position", "label", "logp_y", "entropy", "top1")}
    tcols: dict[str, list[np.ndarray]] = {k: [] for k in ("logp_y", "entropy", "top1", "agree", "kl")}
    try:
        # batches of similar length (less padding); the per-token arrays are put back in example order below
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        for start in range(0, len(examples), batch_size):
            batch_ids = order[start:start + batch_size]
            items = []
            for i in batch_ids:
                item = dict(examples[i])
                if teacher_cache is not None:
                    item.update({CACHE_ROW: int(cache_rows[i]), CACHE_SPLIT: cache_split})
                items.append(item)
            batch = collator(items)
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX  # [B, T-1]
            if not bool(mask.any()):
                if on_batch:
                    on_batch(len(items))
                continue
            model_batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                                "position_ids")}
            hidden = _decoder_hidden(model, model_batch)[:, :-1][mask.to(device)]  # [n, H]
            t_hidden = None
            if teacher is not None:
                t_dev = next(causal_lm_of(teacher).parameters()).device
                t_hidden = _decoder_hidden(teacher, {k: v.to(t_dev) for k, v in model_batch.items()})
                t_hidden = t_hidden[:, :-1][mask.to(t_dev)].to(device)
            topk = None
            if teacher_cache is not None:
                topk = [batch[k][:, 1:][mask].to(device) for k in TEACHER_KEYS]
            y = labels[mask].to(device)
            counts = mask.sum(1)
            rows = torch.repeat_interleave(torch.tensor(batch_ids), counts)
            positions = torch.cat([torch.arange(int(c)) for c in counts])
            cols["row"].append(rows.numpy())
            cols["position"].append(positions.numpy())
            cols["label"].append(y.cpu().numpy())
            for a in range(0, y.numel(), chunk):
                sl = slice(a, min(y.numel(), a + chunk))
                z = head.logits(hidden[sl])
                s = _token_stats(z, y[sl])
                cols["logp_y"].append(s["logp_y"].double().cpu().numpy())
                cols["entropy"].append(s["entropy"].double().cpu().numpy())
                cols["top1"].append((s["argmax"] == y[sl]).cpu().numpy())
                if t_hidden is None and topk is None:
                    continue
                if t_hidden is not None:
                    tz = t_head.logits(t_hidden[sl])
                else:
                    tz = dense_teacher_logprobs(topk[0][sl], topk[1][sl], topk[2][sl], z, teacher_tail)
                t = _token_stats(tz, y[sl])
                pt = t["logp"].exp()
                # KL(T || S) = sum_v pT (log pT - log pS); 0 where pT = 0
                kl = torch.where(pt > 0, pt * (t["logp"] - s["logp"]), torch.zeros_like(pt)).sum(-1)
                tcols["logp_y"].append(t["logp_y"].double().cpu().numpy())
                tcols["entropy"].append(t["entropy"].double().cpu().numpy())
                tcols["top1"].append((t["argmax"] == y[sl]).cpu().numpy())
                tcols["agree"].append((t["argmax"] == s["argmax"]).cpu().numpy())
                tcols["kl"].append(kl.clamp_min(0).double().cpu().numpy())
                del z, s, t, pt, kl
            if on_batch:
                on_batch(len(items))
    finally:
        for m, mode in was_training:
            m.train(mode)
    if not cols["logp_y"]:
        raise ValueError("the examples have no supervised token to profile (every label is -100 after the shift)")
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    back = np.lexsort((cat["position"], cat["row"]))  # example order, then position
    cat = {k: v[back] for k, v in cat.items()}
    logp_y = cat["logp_y"]
    teacher_out: dict[str, np.ndarray] = {}
    if tcols["logp_y"]:
        teacher_out = {k: np.concatenate(v)[back] for k, v in tcols.items()}
        teacher_out["p_y"] = np.exp(teacher_out["logp_y"])
    return TokenProfile(row=cat["row"].astype(np.int64), position=cat["position"].astype(np.int64),
                        label=cat["label"].astype(np.int64), p_y=np.exp(logp_y), logp_y=logp_y,
                        entropy=cat["entropy"], top1=cat["top1"].astype(bool), teacher=teacher_out)
