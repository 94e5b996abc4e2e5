"""LoRA target modules that fit the model.

`lora_target_modules: [auto]` (the default) adapts the attention projections the model actually has,
found from its modules rather than from a fixed list of names: q/k/v/o_proj on Llama-like models,
qkv_proj + o_proj on Phi-3 (fused q, k, v), query_key_value + dense on Falcon / GPT-NeoX / Bloom,
c_attn + attn.c_proj on GPT-2, q/k/v_proj + out_proj on OPT, ... A name that also names a module outside
attention (GPT-2's c_proj is the MLP's output projection too) is qualified with the attention module's
attribute (`attn.c_proj`), so the adapter holds exactly the attention projections.

A configured list is checked against the model: a name that matches no module LoRA can adapt is refused,
listing the names the model has. PEFT matches a target `t` to every module whose name is `t` or ends
with `.t`; `all-linear` (every linear layer but the output head) is passed through.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

AUTO = "auto"
ALL_LINEAR = "all-linear"
# module classes PEFT's LoRA can wrap (transformers' GPT-2-style Conv1D is a linear layer with a transposed weight)
ADAPTABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, ADAPTABLE) or type(module).__name__ == "Conv1D"


def matches(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the module's full name is `target` or ends with `.target`."""
    return name == target or name.endswith(f".{target}")


def structure_model(model_or_name: nn.Module | str) -> nn.Module:
    """The model itself, or one built on the meta device from a folder's / hub id's config (no weights read)."""
    if isinstance(model_or_name, nn.Module):
        return model_or_name
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 - only for a name

    from qtarget.models.load import resolve  # noqa: PLC0415 - load imports heavy modules

    config = AutoConfig.from_pretrained(resolve(model_or_name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _attention_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module (layer 0's) whose class is an attention block with linear children."""
    for name, module in model.named_modules():
        if "Attention" in type(module).__name__ and any(_is_linear(c) for c in module.children()):
            return name, module
    return None


def attention_targets(model: nn.Module) -> list[str]:
    """The attention projections of `model` as PEFT target names (see the module docstring)."""
    found = _attention_module(model)
    if found is None:
        raise ValueError(f"--lora_target_modules auto: found no attention block with linear projections in "
                         f"{type(model).__name__}; list the modules to adapt (its linear modules: "
                         f"{', '.join(module_names(model))})")
    attn_name, attn = found
    attr = attn_name.rsplit(".", 1)[-1]
    linear = [n for n, m in model.named_modules() if _is_linear(m)]
    targets = []
    for child, module in attn.named_children():
        if not _is_linear(module):
            continue
        everywhere = {n for n in linear if matches(n, child)}
        in_attention = {n for n in linear if matches(n, f"{attr}.{child}")}
        targets.append(child if everywhere == in_attention else f"{attr}.{child}")
    return targets


def module_names(model: nn.Module) -> list[str]:
    """The distinct last components of the module names LoRA can adapt (sorted): what a target may name."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_adaptable(m)})


def resolve_targets(model_or_name: nn.Module | str, targets: Sequence[str] | str) -> list[str]:
    """The configured targets as the list PEFT gets: `auto` -> the model's attention projections; every
    other name must match a module LoRA can adapt (ValueError naming the ones that do not, and listing
    the model's module names)."""
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    targets = [t for t in targets if t]
    if not targets:
        raise ValueError("--lora_target_modules is empty: pass auto, all-linear or module names")
    if targets == [ALL_LINEAR]:
        return targets
    model = structure_model(model_or_name)
    out: list[str] = []
    for t in targets:
        for name in (attention_targets(model) if t == AUTO else [t]):
            if name not in out:
                out.append(name)
    adaptable = [n for n, m in model.named_modules() if n and _is_adaptable(m)]
    missing = [t for t in out if not any(matches(n, t) for n in adaptable)]
    if missing:
        raise ValueError(f"--lora_target_modules: {', '.join(repr(t) for t in missing)} match(es) no module of "
                         f"{type(model).__name__} that LoRA can adapt; its module names are: "
                         f"{', '.join(module_names(model))} (or use auto / all-linear)")
    return out


def lora_target_argument(targets: list[str]) -> list[str] | str:
    """What LoraConfig(target_modules=...) takes: the string 'all-linear' or the list."""
    return ALL_LINEAR if targets == [ALL_LINEAR] else list(targets)
