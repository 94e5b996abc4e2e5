"""From any loss to its target Q (SPEC §1, paper App. D): dL/dz = c (p - Q)  =>  Q = p - g / c."""
from __future__ import annotations

import torch
from torch import Tensor

from qtarget.objectives import Objective, get_objective
from qtarget.objectives.supervised import supervised_rows


def implied_target(objective: str | Objective, logits: Tensor, labels: Tensor, return_scale: bool = False,
                   *, ignore_index: int = -100, **aux: Tensor | None):
    """Q [..., V] per position whose per-token loss gradient w.r.t. the logits is c (p - Q).

    g is computed by autograd from the objective's per-token loss, so user objectives work too;
    c is the objective's `implied_scale` (1 unless SPEC §2 says otherwise: sft_kl 1+lam, asft
    p_y+lam). Ignored positions get Q = 0 (and c = 0). With return_scale=True returns (Q, c [...]).
    aux: teacher_logits, ref_logits, old_logprobs, token_weights as for `token_loss`.
    """
    objective = get_objective(objective)
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match labels shape {tuple(labels.shape)}")
    V = logits.shape[-1]
    sup = supervised_rows(objective, labels, V, dict(aux), ignore_index=ignore_index)
    flat = sup.flat
    with torch.enable_grad():
        z = logits.reshape(-1, V)[flat].detach().to(torch.float32).requires_grad_(True)
        x = sup.token_inputs(z, aux)
        (g,) = torch.autograd.grad(objective.terms(x).loss.sum(), z)
    scale = torch.as_tensor(objective.implied_scale(x), dtype=torch.float32).expand(z.shape[0])
    Q_valid = torch.softmax(z.detach(), -1) - g / scale.unsqueeze(-1)
    Q = torch.zeros(flat.shape[0], V, dtype=torch.float32, device=logits.device)
    Q[flat] = Q_valid
    Q = Q.reshape(tuple(labels.shape) + (V,))
    if not return_scale:
        return Q
    c = torch.zeros(flat.shape[0], dtype=torch.float32, device=logits.device)
    c[flat] = scale
    return Q, c.reshape(labels.shape)
