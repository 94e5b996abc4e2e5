"""The lab's arithmetic precision, the same for the base model and every row: `bf16` runs every matrix
product (training, teacher-forced scoring, generation) in bfloat16 under `torch.autocast`, with float32
weights, optimizer state, residual stream, norms and loss math; `fp32` runs everything in float32.

On a CPU with AVX512-BF16 the bf16 products are ~2-3x faster than float32 ones (measured in
benchmarks/lab_trunk.py with the drift they cause; docs/lab.md). Autocast with frozen float32 weights casts
them at every call (the 49,152 x 576 LM head alone: ~90 ms), which costs most during generation (one token
per call) and scoring: `inference_model` gives a copy whose linear layers hold their bfloat16 weights
already, so autocast's cast is a no-op and the numbers are the ones autocast gives the float32 model, bit
for bit (tested); the lab scores, generates and runs frozen reference / teacher models through such copies,
and `bf16_head` does the same for a training student's frozen LM head. On a CPU, bf16 attention through
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
# CPU flags of native bfloat16 matrix products (Linux /proc/cpuinfo). Without them torch emulates bf16: on an
# AVX2-only AMD EPYC a [512 x 576] x [576 x 1536] product took 61 ms in bf16 against 8 ms in float32
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str) -> str:
    """`auto` -> bf16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), fp32 elsewhere (bf16
    would be emulated there, several times slower than float32); bf16 and fp32 as given."""
    if precision == "auto":
        return "bf16" if cpu_flags() & set(NATIVE_BF16_FLAGS) else "fp32"
    return check_precision(precision)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def compute_context(precision: str, model: nn.Module) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `model`'s device (nothing for fp32). The weight cache is off:
    the lab trains inside the context, and a cached cast of a trained weight would go stale."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)


def inference_model(model: nn.Module, precision: str) -> nn.Module:
    """`model` itself (fp32), or a frozen copy whose nn.Linear weights (the LM head included, untied from the
    embedding, which stays float32) are bfloat16: under `compute_context` it computes what the float32
    model computes under autocast, without casting every weight at every call (each generated token, each
    scored batch). Its embedding and the residual stream stay float32, so a trunk read from it is float32."""
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


class bf16_head:  # noqa: N801 - a context manager used like a function
    """`with bf16_head(model, precision):` a frozen LM head (tied to the frozen embedding in the lab) holds a
    bfloat16 copy of its weight for the block — what autocast would cast it to at every step — and gets its
    own weight back (the tie restored) on leaving. A trainable head, or fp32, is left alone."""

    def __init__(self, model: nn.Module, precision: str) -> None:
        self.head = model.get_output_embeddings()
        self.active = (check_precision(precision) == "bf16" and self.head is not None
                       and not self.head.weight.requires_grad)

    def __enter__(self) -> None:
        if self.active:
            self.weight = self.head.weight
            self.head.weight = nn.Parameter(self.weight.detach().to(torch.bfloat16), requires_grad=False)

    def __exit__(self, *exc) -> None:
        if self.active:
            self.head.weight = self.weight
