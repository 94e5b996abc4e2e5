"""Shared pytest fixtures (kept small: nothing here slows collection).

Offline by construction: the HF offline switches are set when this file is imported, before any test module
imports transformers / huggingface_hub / datasets (they read them at import time).

Fixtures:
    smollm2_tokenizer  (session) SmolLM2-135M-Instruct tokenizer; shared, so do not mutate it (copy.deepcopy)
    gpt2_tokenizer     (session) GPT-2 BPE tokenizer; shared, same rule
    tiny_model         (function) fresh random 2-layer Llama on the SmolLM2 vocab (~0.3 s), safe to train
    smollm2_path       (session) folder of the real SmolLM2-135M-Instruct; use only in @pytest.mark.slow tests
"""
from __future__ import annotations

import os

import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP workers sleep instead of spinning: on a shared 2-core box spinning threads made small
# batched matmuls an order of magnitude slower (measured by the eval tests).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _offline_and_threads():
    """Keep the offline switches on for the whole session and cap torch at 2 intra-op threads (the CI box has
    2 cores; more threads only oversubscribe)."""
    import torch

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def one_torch_thread():
    """Generation is many tiny ops: on a loaded 2-core box, 2 spinning OpenMP threads were measured ~10x
    slower than 1 thread, so generation tests decode single-threaded."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from qtarget.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from qtarget.models import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture
def tiny_model(smollm2_tokenizer):
    from qtarget.models import tiny_causal_lm

    return tiny_causal_lm(smollm2_tokenizer)


@pytest.fixture(scope="session")
def smollm2_path():
    from qtarget.models import smollm2_dir

    return smollm2_dir()
