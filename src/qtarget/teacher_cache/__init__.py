"""Offline teacher: run a teacher once over the tokenised training rows, store its top-k
distribution at every supervised token (safetensors shards + manifest), and train from that cache
with no teacher in memory. See docs/teacher_cache.md for the schema and the tail options.

    build_cache(teacher, tokenizer, examples, "cache/", top_k=64)     # API (loaded models, tokenised rows)
    qtarget teacher-cache --teacher_model T --model S --dataset D --output_dir DIR --top_k 64   # CLI
    TeacherCache("cache/")                                              # reader (validated on open)
    qtarget train ... --teacher_cache DIR [--teacher_tail student]     # training from the cache
"""
from qtarget.teacher_cache.build import build_cache, cache_folder, teacher_topk_rows
from qtarget.teacher_cache.manifest import DATA_KEYS, Manifest, SplitInfo
from qtarget.teacher_cache.reader import BATCH_KEYS, CachedRow, MissingRowError, TeacherCache
from qtarget.teacher_cache.storage import CorruptShardError

__all__ = ["build_cache", "cache_folder", "teacher_topk_rows", "TeacherCache", "CachedRow", "Manifest", "SplitInfo", "DATA_KEYS",
           "BATCH_KEYS", "MissingRowError", "CorruptShardError"]
