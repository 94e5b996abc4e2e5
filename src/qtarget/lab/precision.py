"""The lab's arithmetic precision, the same for the base model and every row: `bf16` runs every matrix
product (training, teacher-forced scoring, generation) in bfloat16 under `torch.autocast`, with float32
weights, optimizer state, residual stream, norms and loss math; `fp32` runs everything in float32.

On a CPU with AVX512-BF16 the bf16 products are ~2-3x faster than float32 ones (measured in
benchmarks/lab_trunk.py with the drift they cause; docs/lab.md). Autocast with frozen float32 weights casts
them at every call, which costs most during generation (one token per call): `generation_model` gives a
copy whose linear layers hold their bfloat16 weights already, so autocast's cast is a no-op and the
numbers are the ones autocast gives the float32 model, bit for bit (tested). On a CPU, bf16 attention through
SDPA's fused kernel is slower than float32 (its backward ~3x, measured): `prepare_model` switches such a model
to the eager attention (bf16 products, float32 softmax under autocast), 1.7x faster per training step than
float32 where SDPA in bf16 gave 1.3x.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

PRECISIONS = ("bf16", "fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def compute_context(precision: str, model: nn.Module) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `model`'s device (nothing for fp32). The weight cache is off:
    the lab trains inside the context, and a cached cast of a trained weight would go stale."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)


def generation_model(model: nn.Module, precision: str) -> nn.Module:
    """`model` itself (fp32), or a frozen copy whose nn.Linear weights (the LM head included, untied from the
    embedding, which stays float32) are bfloat16: under `compute_context` it computes what the float32
    model computes under autocast, without casting every weight for every generated token."""
    if check_precision(precision) == "fp32":
        return model
    fast = copy.deepcopy(model)
    for module in fast.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(torch.bfloat16), requires_grad=False)
    fast.eval()
    return fast


def prepare_model(model: nn.Module, precision: str) -> nn.Module:
    """Set `model`'s attention for `precision`: eager attention for bf16 on a CPU (faster there than SDPA in
    bf16; the same math), unchanged otherwise. Copies made later inherit it. Returns the model."""
    if check_precision(precision) == "bf16" and next(model.parameters()).device.type == "cpu":
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:  # pragma: no cover - older transformers
            model.config._attn_implementation = "eager"
    return model
