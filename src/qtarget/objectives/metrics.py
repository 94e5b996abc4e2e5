"""Per-token metrics of one chunk of supervised rows and their running means over chunks (the same
for the full-logits path and the fused engine)."""
from __future__ import annotations

import torch
from torch import Tensor

from qtarget.objectives.base import TokenInputs, TokenTerms, kl_to


def token_metrics(x: TokenInputs, terms: TokenTerms, teacher_temperature: float = 1.0) -> dict[str, Tensor]:
    """Per-token metric values [n] (detached) for one chunk of supervised positions. kl_teacher is
    KL(pi_T || p) with pi_T = softmax(teacher_logits / teacher_temperature), the objective's pi_T."""
    with torch.no_grad():
        logp = x.logp.detach()
        out = {
            "nll": -x.logp_y.detach(),
            "p_y": x.p_y_detached,
            "entropy": -(logp.exp() * logp).sum(-1),
            "gamma": terms.gamma.detach().to(torch.float32),
            "top1": (logp.argmax(-1) == x.labels).to(torch.float32),
        }
        if x.ref_logits is not None:
            out["kl_ref"] = kl_to(x.ref_logp, logp)
        if x.teacher_logits is not None:
            teacher_logp = x.teacher_logp if teacher_temperature == 1.0 else \
                torch.log_softmax(x.teacher_logits / teacher_temperature, dim=-1)
            out["kl_teacher"] = kl_to(teacher_logp, logp)
        for key, value in terms.extras.items():
            out[key] = value.detach().to(torch.float32)
    return out


class MetricSums:
    """Running sums of per-token metrics over chunks; `means()` divides by the token count."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for key, value in values.items():
            s = value.sum()
            self.sums[key] = self.sums[key] + s if key in self.sums else s
        if values:
            self.count += next(iter(values.values())).numel()

    def means(self) -> dict[str, float]:
        out = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        for key in ("nll", "p_y", "entropy", "gamma"):
            out.setdefault(key, 0.0)
        out["n_tokens"] = float(self.count)
        return out
