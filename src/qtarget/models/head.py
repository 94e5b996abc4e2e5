"""An LM head as a value: what turns a model's final hidden states into logits.

    logits = softcap(logit_scale * (hidden @ weight^T + bias))        softcap(z) = c * tanh(z / c)

read from any causal LM (student, teacher, reference) the same way, with the *effective* weight:
PEFT LoRA adapters on the head (W + s * B @ A, and B's bias) and `modules_to_save` copies are taken
into account, disabled adapters are not. `LMHead.vocab_size` may differ from the weight's row count:
rows past it are dropped, and missing rows are padded with logit -inf (probability 0). That is how a
teacher whose embedding matrix is padded to another multiple than the student's is put on the
student's vocabulary (both share one tokenizer; rows past the tokenizer are padding no label hits).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn


@dataclass
class LMHead:
    weight: Tensor  # [rows, H]
    bias: Tensor | None = None  # [rows]
    logit_scale: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None  # the V the logits are put on (default: rows)

    @property
    def rows(self) -> int:
        return int(self.weight.shape[0])

    @property
    def vocab(self) -> int:
        return self.rows if self.vocab_size is None else int(self.vocab_size)

    def on_vocab(self, vocab_size: int) -> "LMHead":
        """The same head with its logits put on `vocab_size` entries (extra rows dropped: a view, no copy)."""
        vocab_size = int(vocab_size)
        if vocab_size < self.rows:
            bias = None if self.bias is None else self.bias[:vocab_size]
            return replace(self, weight=self.weight[:vocab_size], bias=bias, vocab_size=vocab_size)
        return replace(self, vocab_size=vocab_size)

    def detached(self) -> "LMHead":
        return replace(self, weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())

    def cloned(self) -> "LMHead":
        """A detached copy that outlives a sharding engine freeing its gathered parameters."""
        return replace(self, weight=self.weight.detach().clone(),
                       bias=None if self.bias is None else self.bias.detach().clone())

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., vocab] float logits of `hidden [..., H]` (the reference computation, builds all logits)."""
        z = hidden.to(self.weight.dtype) @ self.weight.t()
        if self.bias is not None:
            z = z + self.bias
        z = z.float() * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        if self.vocab > self.rows:
            pad = z.new_full(z.shape[:-1] + (self.vocab - self.rows,), float("-inf"))
            z = torch.cat([z, pad], dim=-1)
        return z


def logit_transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) of a model config: Cohere's logit_scale, Granite's 1/logits_scaling,
    Gemma's final_logit_softcapping."""
    cfg = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(cfg, "logit_scale", None):
        scale = float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None):
        scale = 1.0 / float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def unwrap_module(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP1 / torch.compile wrappers (not PEFT)."""
    while True:
        if hasattr(model, "_fsdp_wrapped_module"):
            model = model._fsdp_wrapped_module
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM module under DDP / FSDP1 / PEFT wrappers."""
    model = unwrap_module(model)
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = unwrap_module(model.get_base_model())
    return model


def _is_modules_to_save(module: nn.Module) -> bool:
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def _lora_weight_and_bias(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """W + sum over active adapters of s_a * B_a @ A_a (and s_a * B_a.bias), differentiable in A, B."""
    base = unwrap_module(module.base_layer)
    weight, bias = base.weight, getattr(base, "bias", None)
    if module.disable_adapters or getattr(module, "merged", False):
        return weight, bias  # merged adapters are already inside the base weight
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError("LoRA on the LM head with fan_in_fan_out=True is not supported by the fused loss")
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise ValueError(f"DoRA adapter {name!r} on the LM head is not supported by the fused loss; "
                             f"use plain LoRA (use_dora=False) or leave lm_head out of target_modules")
        dropout = module.lora_dropout[name]
        if module.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise ValueError(f"LoRA adapter {name!r} on the LM head has lora_dropout={dropout.p}: dropout on the "
                             f"head's input cannot be folded into an effective weight; set lora_dropout=0")
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        s = module.scaling[name]
        weight = weight + (s * (b.to(torch.float32) @ a.to(torch.float32))).to(weight.dtype)
        b_bias = getattr(module.lora_B[name], "bias", None)
        if b_bias is not None:
            bias = s * b_bias if bias is None else bias + s * b_bias
    return weight, bias


def head_of_module(head: nn.Module, config=None) -> LMHead:
    """The effective head of an output-embedding module (a Linear, or PEFT's wrappers of one)."""
    module = unwrap_module(head)
    if _is_modules_to_save(module):
        active = module.active_adapters
        if module.disable_adapters or not active or active[0] not in module.modules_to_save:
            module = module.original_module
        else:
            module = module.modules_to_save[active[0]]
        module = unwrap_module(module)
    if _is_lora_layer(module):
        weight, bias = _lora_weight_and_bias(module)
    else:
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"the LM head ({type(head).__name__}) has no [V, H] weight; got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__} "
                         f"(a sharded parameter outside the model's forward?)")
    scale, softcap = logit_transform(config)
    return LMHead(weight=weight, bias=bias, logit_scale=scale, softcap=softcap)


def lm_head_of(model: nn.Module) -> LMHead:
    """The effective head of a causal LM (through DDP / PEFT wrappers). Outside a forward, only for
    models whose parameters are not sharded."""
    lm = causal_lm_of(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embedding (LM head)")
    return head_of_module(head, getattr(lm, "config", None))


def head_rows(model: nn.Module) -> int:
    """Rows of the model's LM head from its config (no parameter access, so safe under sharding)."""
    lm = causal_lm_of(model)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return int(cfg.vocab_size)
