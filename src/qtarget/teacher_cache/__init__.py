"""Offline teacher: run a teacher once over the tokenised training rows, store its top-k
distribution at every supervised token (safetensors shards + manifest), and train from that cache
with no teacher in memory. See docs/teacher_cache.md for the schema and the tail options.

    build_cache(teacher, tokenizer, examples, "cache/", top_k=64)     # API (loaded models, tokenised rows)
    qtarget teacher-cache --teacher_model T --model S --dataset D --output_dir DIR --top_k 64   # CLI
    TeacherCache("cache/")                                              # reader (validated on open)
    qtarget train ... --teacher_cache DIR [--teacher_tail student]     # training from the cache
"""
from __future__ import annotations

from qtarget.lazy import lazy_attributes

# Loaded on first use: the reader (TeacherCache) is part of the torch-only core; the builder runs a
# Hugging Face model (the 'hf' extra).
_EXPORTS = {
    "build_cache": "build", "cache_folder": "build", "teacher_topk_rows": "build",
    "DATA_KEYS": "manifest", "Manifest": "manifest", "SplitInfo": "manifest",
    "BATCH_KEYS": "reader", "CachedRow": "reader", "MissingRowError": "reader", "TeacherCache": "reader",
    "CorruptShardError": "storage",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, {name: "." + module for name, module in _EXPORTS.items()})
