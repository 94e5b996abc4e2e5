"""A qtarget objective as the loss of verl's engine SFT trainer (verl >= 0.9, `verl/trainer/sft_trainer.py`).

verl's engines call the loss installed with `TrainingWorker.set_loss_fn` once per micro-batch as
`loss_fn(model_output=..., data=..., dp_group=...)`, where

    model_output["log_probs"]   log p(token t+1 | <= t), a jagged (nested) tensor [bsz, j] in the
                                no-padding mode (padded [bsz, T] otherwise)
    data["loss_mask"]           per input token (1 = supervised), same layout, NOT shifted: verl's own
                                `sft_loss` rolls it left by one token to align it with log_probs
    data["batch_num_tokens"]    the supervised tokens of the whole global batch (all micro-batches, all
                                data-parallel ranks)
    data["dp_size"]             the data-parallel size (gradients are averaged over ranks)

and backpropagates the returned loss; the loss is sum(per-token loss) / batch_num_tokens * dp_size, so the
gradients summed over micro-batches and averaged over ranks are the token mean over the global batch.
`VerlLoss` keeps that contract with the objective's per-token loss in place of -log p(y): for sft it is
verl's `sft_loss`. Only objectives computable from log p(y) are possible here (see label_logprob.py);
psft reads log pi_old(y) from data["old_log_probs"] (log_probs' layout: a log_probs output of an earlier
forward, e.g. verl's `infer_batch`), token_weighted its weights from data["token_weights"] (loss_mask's
layout). This module imports neither verl nor tensordict: it reads the batch by key.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qtarget.integrations.label_logprob import NeedsDistributionError, check_label_only, label_terms
from qtarget.objectives import Objective, get_objective

NO_PADDING = "no_padding"
# what verl would have to do for an objective that reads more than log p(y)
VERL_DISTRIBUTION_HINT = ("verl's engine hands a loss the full logits only on its distillation path (the loss is "
                          "also called as loss_fn(student_logits=[1, tokens, V], data=...) when the batch sets "
                          "distillation_use_topk, use_fused_kernels off); see docs/integrations.md")
OLD_LOG_PROBS_KEY = "old_log_probs"
TOKEN_WEIGHTS_KEY = "token_weights"


def _plain(value: Any) -> Any:
    """A tensordict NonTensorData unwrapped to its value (verl's tu.get_non_tensor_data); others as is."""
    return value.data if type(value).__name__ == "NonTensorData" else value


def _get(data: Any, key: str, default: Any = None) -> Any:
    try:
        return _plain(data.get(key, default))
    except (KeyError, AttributeError):
        return default


def _flat(value: Tensor) -> Tensor:
    """The packed values [total] of a jagged tensor (a plain tensor is flattened)."""
    return value.values() if value.is_nested else value.reshape(-1)


class VerlLoss:
    """verl's loss-function contract for a qtarget objective: `VerlLoss("dft")(model_output=, data=)`
    returns (loss, metrics). `objective` is a name (with `params`) or an Objective instance; objectives
    that need the model's distribution, a teacher or a reference model are refused here with what verl
    would have to pass."""

    def __init__(self, objective: str | Objective, **params: Any) -> None:
        self.objective = get_objective(objective, **params)
        try:
            check_label_only(self.objective)
        except NeedsDistributionError as e:
            raise NeedsDistributionError(f"{e}; {VERL_DISTRIBUTION_HINT}") from None

    def __repr__(self) -> str:
        return f"VerlLoss({self.objective!r})"

    def __call__(self, config: Any = None, model_output: Any = None, data: Any = None, dp_group: Any = None,
                 **kwargs: Any) -> tuple[Tensor, dict]:
        if kwargs.get("student_logits") is not None:
            raise ValueError("VerlLoss computes its loss from log_probs only: turn off distillation "
                             "(distillation_use_topk) for a qtarget loss")
        if model_output is None or data is None:
            raise ValueError("VerlLoss is called by verl's engine as loss_fn(model_output=..., data=...)")
        dp_size = _get(data, "dp_size")
        batch_num_tokens = _get(data, "batch_num_tokens")
        if dp_size is None or batch_num_tokens is None:
            raise ValueError("the batch lacks `dp_size` / `batch_num_tokens`, which verl's engine sets in "
                             "forward_backward_batch before calling the loss")
        logp_y, mask, old, weights = self._token_rows(model_output["log_probs"], data)
        sel = mask.nonzero().squeeze(-1)
        dtype = torch.promote_types(logp_y.dtype, torch.float32)  # bf16 log-probs are summed in float32
        terms = label_terms(self.objective, logp_y[sel].to(dtype),
                            old_logprobs=None if old is None else old[sel].to(dtype),
                            token_weights=None if weights is None else weights[sel].to(dtype))
        loss = terms.loss.sum() / batch_num_tokens * dp_size
        return loss, {}

    def _token_rows(self, log_probs: Tensor, data: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(log p(y) [N], supervised mask [N] bool, old log-probs [N] or None, weights [N] or None) over
        the micro-batch's positions, aligned as verl's sft_loss aligns them."""
        needs = self.objective.needs
        pad_mode = _get(data, "pad_mode", NO_PADDING)
        pad_mode = getattr(pad_mode, "value", pad_mode)
        if pad_mode == NO_PADDING:
            # loss_mask is per input token; log_probs[t] is log p(token t+1): shift the mask (and the
            # per-input-token weights) left by one, as verl's sft_loss does
            mask = torch.roll(_flat(data["loss_mask"]), shifts=-1, dims=0).bool()
            shift = True
        else:
            mask = _flat(data["response_mask"]).bool()
            shift = False
        logp_y = _flat(log_probs)
        old = weights = None
        if "old_logprobs" in needs:
            old = self._required(data, OLD_LOG_PROBS_KEY, "log pi_old(y) in log_probs' layout")
            old = _flat(old).detach()
        if "token_weights" in needs:
            weights = _flat(self._required(data, TOKEN_WEIGHTS_KEY, "a weight per input token (loss_mask's layout)"))
            weights = torch.roll(weights, shifts=-1, dims=0) if shift else weights
        for name, value in (("old_log_probs", old), ("token_weights", weights), ("loss_mask", mask)):
            if value is not None and value.shape != logp_y.shape:
                raise ValueError(f"`{name}` has {value.numel()} values but log_probs has {logp_y.numel()}: "
                                 f"they must share the micro-batch's token layout")
        return logp_y, mask, old, weights

    def _required(self, data: Any, key: str, what: str) -> Tensor:
        value = _get(data, key)
        if value is None:
            raise ValueError(f"objective {self.objective.name!r} needs `{key}` in the batch ({what}); verl's "
                             f"SFT dataset does not provide it: add it with a custom dataset (data.custom_cls)")
        return value


def verl_loss(objective: str | Objective = "sft", **params: Any) -> VerlLoss:
    """The loss to install with `TrainingWorker.set_loss_fn(loss_fn=verl_loss("dft"))`."""
    return VerlLoss(objective, **params)


def install(trainer: Any, objective: str | Objective, **params: Any) -> VerlLoss:
    """Install the objective as the loss of a built verl `SFTTrainer` (its training client's set_loss_fn,
    the hook verl's own trainer uses for its sft_loss)."""
    loss = VerlLoss(objective, **params)
    trainer.loss_fn = loss
    trainer.training_client.set_loss_fn(loss_fn=loss)
    return loss
