"""Shard files: one safetensors file per range of rows, written atomically, read lazily.

A shard is written to a temporary file in the same folder and renamed into place (os.replace), so a
shard file that exists is complete; an interrupted build leaves at most a stray `.tmp` file that the
next build removes. Reading checks the format, the manifest digest and a sha256 of the tensor bytes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from qtarget.teacher_cache.schema import FORMAT, TENSORS, VERSION, shard_name, tensors_sha256


META_KEY = "qtarget_teacher_cache"


class CorruptShardError(ValueError):
    """A shard file that cannot be read, or whose contents do not match its checksum or manifest."""


def shard_path(root: Path, split: str, shard: int) -> Path:
    return Path(root) / split / shard_name(shard)


def write_shard(root: Path, split: str, shard: int, tensors: dict[str, torch.Tensor], manifest_digest: str) -> Path:
    """Write one shard atomically; `tensors` holds every name in TENSORS."""
    missing = [n for n in TENSORS if n not in tensors]
    if missing:
        raise ValueError(f"shard {shard}: missing tensor(s) {', '.join(missing)}")
    tensors = {n: tensors[n].contiguous().cpu() for n in TENSORS}
    meta = {"format": FORMAT, "version": str(VERSION), "split": split, "shard": str(shard),
            "manifest_digest": manifest_digest, "sha256": tensors_sha256(tensors)}
    # one metadata entry holding sorted JSON: safetensors keeps metadata in a hash map, so several
    # entries would be written in a varying order and equal shards would differ in bytes
    meta = {META_KEY: json.dumps(meta, sort_keys=True)}
    final = shard_path(root, split, shard)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, final)
    return final


def remove_stale_temporaries(root: Path) -> None:
    for tmp in Path(root).glob("*/.shard-*.tmp-*"):
        tmp.unlink(missing_ok=True)


def read_shard(path: Path, *, split: str, shard: int, manifest_digest: str, verify: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of one shard (memory-mapped by safetensors). Raises CorruptShardError naming the
    file and what is wrong: unreadable, wrong format / split / shard, built for another manifest,
    checksum mismatch (with verify=True), or inconsistent index tensors."""
    path = Path(path)
    fix = f"delete {path} and re-run `qtarget teacher-cache` with the same arguments to rebuild it"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CorruptShardError(f"teacher cache shard {path} cannot be read ({e}): {fix}") from None
    expected = {"format": FORMAT, "version": str(VERSION), "split": split, "shard": str(shard)}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CorruptShardError(f"teacher cache shard {path}: metadata `{key}` is {meta.get(key)!r}, expected {value!r}: {fix}")
    if meta.get("manifest_digest") != manifest_digest:
        raise CorruptShardError(f"teacher cache shard {path} was built for another manifest (digest "
                                f"{meta.get('manifest_digest')!r}, the folder's manifest has {manifest_digest!r}): {fix}")
    missing = [n for n in TENSORS if n not in tensors]
    if missing:
        raise CorruptShardError(f"teacher cache shard {path} lacks tensor(s) {', '.join(missing)}: {fix}")
    if verify and tensors_sha256(tensors) != meta.get("sha256"):
        raise CorruptShardError(f"teacher cache shard {path}: the tensor bytes do not match the shard's sha256 "
                                f"(the file is corrupted): {fix}")
    _check_index(tensors, path, fix)
    return tensors


def _check_index(t: dict[str, torch.Tensor], path: Path, fix: str) -> None:
    R = t["row_index"].numel()
    m = t["positions"].numel()
    problems = []
    if tuple(t["row_fingerprint"].shape) != (R,):
        problems.append(f"row_fingerprint has shape {tuple(t['row_fingerprint'].shape)}, expected ({R},)")
    off = t["row_offsets"]
    if tuple(off.shape) != (R + 1,) or int(off[0]) != 0 or int(off[-1]) != m or bool((off[1:] < off[:-1]).any()):
        problems.append(f"row_offsets must be non-decreasing from 0 to {m} with {R + 1} entries")
    if t["ids"].dim() != 2 or t["ids"].shape[0] != m:
        problems.append(f"ids has shape {tuple(t['ids'].shape)}, expected ({m}, k)")
    elif tuple(t["logprobs"].shape) != tuple(t["ids"].shape):
        problems.append(f"logprobs has shape {tuple(t['logprobs'].shape)}, expected {tuple(t['ids'].shape)}")
    if tuple(t["log_tail"].shape) != (m,):
        problems.append(f"log_tail has shape {tuple(t['log_tail'].shape)}, expected ({m},)")
    if problems:
        raise CorruptShardError(f"teacher cache shard {path}: {'; '.join(problems)}: {fix}")
