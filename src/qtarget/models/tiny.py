"""A small random Llama built from config, for fast tests."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_causal_lm(
    tokenizer_or_vocab_size: PreTrainedTokenizerBase | int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """Random ``LlamaForCausalLM`` (float32, eval mode), identical weights for identical arguments and seed.

    With a tokenizer, the vocab size is ``len(tokenizer)`` and pad/bos/eos ids are taken from it; with an int,
    those ids are left unset (None). ``intermediate_size`` defaults to ``4 * hidden_size``. The global torch RNG
    state is left as it was.
    """
    if isinstance(tokenizer_or_vocab_size, bool) or not isinstance(tokenizer_or_vocab_size, int):
        tok = tokenizer_or_vocab_size
        if not hasattr(tok, "__len__") or not hasattr(tok, "pad_token_id"):
            raise TypeError(
                "tiny_causal_lm: tokenizer_or_vocab_size must be a tokenizer or a positive int, "
                f"got {type(tok).__name__}"
            )
        vocab_size = len(tok)
        ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    else:
        vocab_size = tokenizer_or_vocab_size
        ids = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    if vocab_size < 2:
        raise ValueError(f"tiny_causal_lm: vocab size must be >= 2, got {vocab_size}")
    if hidden_size % num_heads:
        raise ValueError(f"tiny_causal_lm: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
