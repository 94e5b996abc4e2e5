"""From a causal LM to the inputs of the fused loss: last hidden states and the LM head, without the
model ever building its full [B, T, V] logits.

The model is called through its (possibly DDP / PEFT) wrapper with `logits_to_keep=1` (only the last
position's logits are computed) while a forward hook on the decoder captures its output, the final
normalised hidden states [B, T, H] that the LM head multiplies.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers (not PEFT)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM module under DDP and PEFT wrappers."""
    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def model_inputs(batch: dict[str, Any]) -> dict[str, Tensor]:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


def last_hidden_states(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """[B, T, H] final hidden states of `model` (called through its wrappers, so DDP hooks run)."""
    decoder = base_causal_lm(model).get_decoder()
    captured: dict[str, Tensor] = {}

    def hook(_module, _args, output):
        h = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
        captured["h"] = h

    handle = decoder.register_forward_hook(hook)
    try:
        model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"the decoder of {type(base_causal_lm(model)).__name__} was not called in forward")
    return captured["h"]


def shift(batch: dict[str, Any], key: str) -> Tensor | None:
    """batch[key][:, 1:] (targets aligned with hidden[:, :-1]) or None."""
    value = batch.get(key)
    return None if value is None else value[:, 1:]
