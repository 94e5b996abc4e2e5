"""Shared helpers for the training tests (tiny models, toy rows, configs). No tests here."""
from __future__ import annotations

import functools

import torch

from qtarget.models import load_tokenizer, tiny_causal_lm
from qtarget.training import QTargetConfig


@functools.lru_cache(maxsize=None)
def tokenizer(name: str = "gpt2"):
    return load_tokenizer(name)


def toy_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """prompt/response rows of varied lengths (so micro-batches hold different token counts)."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "sum", "is", "the"]
    rows = []
    for i in range(n):
        k = int(torch.randint(1, 7, (1,), generator=g))
        resp = " ".join(words[int(j)] for j in torch.randint(0, len(words), (k,), generator=g))
        rows.append({"prompt": f"Q{i}: add {i} and {i % 5}.", "response": f" {resp} {i + i % 5}."})
    return rows


def tiny(seed: int = 0, **kw):
    return tiny_causal_lm(tokenizer(), hidden_size=32, num_layers=1, num_heads=2, seed=seed, **kw)


def config(output_dir, **overrides) -> QTargetConfig:
    base = dict(output_dir=str(output_dir), use_cpu=True, disable_tqdm=True, report_to="none",
                per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, save_strategy="no",
                max_length=64, seed=0, plot=False, lr_scheduler_type="constant", warmup_steps=0)
    base.update(overrides)
    return QTargetConfig(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
