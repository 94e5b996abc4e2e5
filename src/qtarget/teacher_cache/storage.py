"""Shard files: one safetensors file per range of rows, written atomically, read lazily.

A shard is written to a temporary file in the same folder and renamed into place (os.replace), so a
shard file that exists is complete; an interrupted build leaves at most a stray `.tmp` file that the
next build removes. Opening a shard reads its header and index only (format, manifest digest,
shapes); `verify_shard` reads it whole and checks the sha256 of its tensor bytes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


@dataclass
class ShardIndex:
    """A shard's header and index tensors (read at open; the big tensors stay on disk)."""

    path: Path
    sha256: str
    row_index: torch.Tensor  # [R] int64
    row_fingerprint: torch.Tensor  # [R] int64
    row_offsets: torch.Tensor  # [R + 1] int64
    shapes: dict[str, tuple[int, ...]]


def _fix(path: Path) -> str:
    return f"delete {path} and re-run `qtarget teacher-cache` with the same arguments to rebuild it"


def open_shard(path: Path, *, split: str, shard: int, manifest_digest: str) -> ShardIndex:
    """Read one shard's header and index. Raises CorruptShardError naming the file and what is wrong:
    unreadable, wrong format / split / shard, built for another manifest, or inconsistent shapes."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            names = set(f.keys())
            missing = [n for n in TENSORS if n not in names]
            if missing:
                raise CorruptShardError(f"teacher cache shard {path} lacks tensor(s) {', '.join(missing)}: {_fix(path)}")
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in TENSORS}
            index = {n: f.get_tensor(n) for n in ("row_index", "row_fingerprint", "row_offsets")}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, CorruptShardError):
            raise
        raise CorruptShardError(f"teacher cache shard {path} cannot be read ({e}): {_fix(path)}") from None
    expected = {"format": FORMAT, "version": str(VERSION), "split": split, "shard": str(shard)}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CorruptShardError(f"teacher cache shard {path}: metadata `{key}` is {meta.get(key)!r}, "
                                    f"expected {value!r}: {_fix(path)}")
    if meta.get("manifest_digest") != manifest_digest:
        raise CorruptShardError(f"teacher cache shard {path} was built for another manifest (digest "
                                f"{meta.get('manifest_digest')!r}, the folder's manifest has {manifest_digest!r}): "
                                f"{_fix(path)}")
    out = ShardIndex(path, str(meta.get("sha256")), index["row_index"], index["row_fingerprint"], index["row_offsets"],
                     shapes)
    _check_index(out)
    return out


def verify_shard(index: ShardIndex) -> None:
    """Read the whole shard and compare its tensors' sha256 with the one in its header."""
    try:
        tensors = load_file(str(index.path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CorruptShardError(f"teacher cache shard {index.path} cannot be read ({e}): {_fix(index.path)}") from None
    if tensors_sha256(tensors) != index.sha256:
        raise CorruptShardError(f"teacher cache shard {index.path}: the tensor bytes do not match the shard's sha256 "
                                f"(the file is corrupted): {_fix(index.path)}")


def _check_index(ix: ShardIndex) -> None:
    R = ix.row_index.numel()
    sh = ix.shapes
    m = sh["positions"][0] if len(sh["positions"]) == 1 else -1
    problems = []
    if len(sh["positions"]) != 1:
        problems.append(f"positions has shape {sh['positions']}, expected (m,)")
    if tuple(ix.row_fingerprint.shape) != (R,):
        problems.append(f"row_fingerprint has shape {tuple(ix.row_fingerprint.shape)}, expected ({R},)")
    off = ix.row_offsets
    if tuple(off.shape) != (R + 1,) or int(off[0]) != 0 or int(off[-1]) != m or bool((off[1:] < off[:-1]).any()):
        problems.append(f"row_offsets must be non-decreasing from 0 to {m} with {R + 1} entries")
    if len(sh["ids"]) != 2 or sh["ids"][0] != m:
        problems.append(f"ids has shape {sh['ids']}, expected ({m}, k)")
    elif sh["logprobs"] != sh["ids"]:
        problems.append(f"logprobs has shape {sh['logprobs']}, expected {sh['ids']}")
    if sh["log_tail"] != (m,):
        problems.append(f"log_tail has shape {sh['log_tail']}, expected ({m},)")
    if problems:
        raise CorruptShardError(f"teacher cache shard {ix.path}: {'; '.join(problems)}: {_fix(ix.path)}")
