"""The on-disk schema of a teacher cache (format "qtarget-teacher-topk", versions 1 and 2).

    DIR/manifest.json                      what was cached and how (see manifest.py)
    DIR/<split>/shard-000000.safetensors   rows [0, R) of the split, R = manifest rows_per_shard
    DIR/<split>/shard-000001.safetensors   rows [R, 2R) ...

One shard is one safetensors file holding the rows of a contiguous range. With m supervised tokens
in those rows (all rows of the shard, in row order, positions ascending):

    row_index        [R]     int64    row indices of the split, ascending and contiguous
    row_fingerprint  [R]     int64    fingerprint of the row's input_ids and labels (`row_fingerprint`)
    row_offsets      [R + 1] int64    the row's tokens are [row_offsets[i], row_offsets[i+1]) below
    positions        [m]     int32    position t in the row; the entry is pi_T of the token labels[t],
                                      i.e. the teacher's prediction from the prefix input_ids[:t]
    ids              [m, k]  uint16 (V <= 65536) or int32: top-k token ids over the student's vocabulary
    logprobs         [m, k]  float32 (or float16 / bfloat16, manifest `logprob_dtype`): log pi_T(ids)
    log_tail         [m]     float32  log(1 - sum_k pi_T): log of the mass outside the top-k (-inf: none)

Version 2 (manifest logprob_dtype "compact", the default) keeps row_index, row_fingerprint and
row_offsets and replaces positions, ids, logprobs and log_tail by zlib blocks (encoding.py):

    block_rows       [B + 1] int64    block b holds the shard's rows [block_rows[b], block_rows[b+1])
    block_bytes      [B + 1] int64    its zlib stream is data[block_bytes[b]:block_bytes[b+1]]
    data             [n]     uint8    the blocks' streams, concatenated

pi_T is softmax(teacher logits / temperature) over the student's vocabulary (the teacher's LM head
rows beyond it are dropped before the softmax). Metadata (safetensors header): one entry,
"qtarget_teacher_cache", a JSON object (sorted keys) with format, version, split, shard,
manifest_digest (`Manifest.digest()`) and sha256 (of the tensors' bytes in the order of TENSORS).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

FORMAT = "qtarget-teacher-topk"
VERSION = 2  # the newest format version; every version in VERSIONS reads
VERSIONS = (1, 2)
MANIFEST = "manifest.json"
TENSORS = ("row_index", "row_fingerprint", "row_offsets", "positions", "ids", "logprobs", "log_tail")  # version 1
TENSORS_V2 = ("row_index", "row_fingerprint", "row_offsets", "block_rows", "block_bytes", "data")
LOGPROB_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # version 1
COMPACT = "compact"
ENCODINGS = (COMPACT, *LOGPROB_DTYPES)  # manifest `logprob_dtype`: how the log-probs are stored
DEFAULT_ENCODING = COMPACT
IGNORE_INDEX = -100


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.safetensors"


def format_version(logprob_dtype: str) -> int:
    """The format version that stores log-probs as `logprob_dtype` (one of ENCODINGS)."""
    if logprob_dtype not in ENCODINGS:
        raise ValueError(f"logprob_dtype must be one of {', '.join(ENCODINGS)}, got {logprob_dtype!r}")
    return 2 if logprob_dtype == COMPACT else 1


def shard_tensor_names(version: int) -> tuple[str, ...]:
    return TENSORS if int(version) == 1 else TENSORS_V2


def id_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 65536 else torch.int32


def supervised_positions(labels: Sequence[int]) -> list[int]:
    """Positions t >= 1 with labels[t] != -100 (position 0 is never predicted)."""
    return [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]


def row_fingerprint(example: Mapping[str, Any]) -> int:
    """int64 fingerprint of one tokenised row: blake2b-8 of its input_ids, labels (and position_ids)."""
    h = hashlib.blake2b(digest_size=8)
    for key in ("input_ids", "labels", "position_ids"):
        if key in example and example[key] is not None:
            h.update(key.encode())
            h.update(np.asarray(example[key], dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def data_fingerprint(fingerprints: Iterable[int]) -> str:
    """sha256 (hex, 16 chars) over the row fingerprints in order."""
    values = np.asarray(list(fingerprints), dtype=np.int64)
    return hashlib.sha256(values.tobytes()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex, 16 chars) of the vocabulary (token -> id) and the special token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a shard's tensors' bytes, in the order of TENSORS (version 1) or TENSORS_V2."""
    h = hashlib.sha256()
    for name in (TENSORS if "ids" in tensors else TENSORS_V2):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
