"""Shard files: one safetensors file per range of rows, written atomically, read lazily.

A shard is written to a temporary file in the same folder and renamed into place (os.replace), so a
shard file that exists is complete; an interrupted build leaves at most a stray `.tmp` file that the
next build removes. Opening a shard reads its header and index only (format, manifest digest,
shapes); `verify_shard` reads it whole and checks the sha256 of its tensor bytes. A shard of format
version 2 stores its tokens in the compact encoding (encoding.py); `write_shard` encodes them when
given the manifest's `encoding`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from qtarget.teacher_cache import encoding as compact
from qtarget.teacher_cache.schema import FORMAT, TENSORS, VERSIONS, shard_name, shard_tensor_names, tensors_sha256


META_KEY = "qtarget_teacher_cache"


class CorruptShardError(ValueError):
    """A shard file that cannot be read, or whose contents do not match its checksum or manifest."""


def shard_path(root: Path, split: str, shard: int) -> Path:
    return Path(root) / split / shard_name(shard)


def write_shard(root: Path, split: str, shard: int, tensors: dict[str, torch.Tensor], manifest_digest: str, *,
                encoding: Mapping[str, Any] | None = None) -> Path:
    """Write one shard atomically; `tensors` holds every name in TENSORS. With the manifest's `encoding`
    (non-empty: the compact encoding) the shard is written in format version 2."""
    missing = [n for n in TENSORS if n not in tensors]
    if missing:
        raise ValueError(f"shard {shard}: missing tensor(s) {', '.join(missing)}")
    tensors = {n: tensors[n].contiguous().cpu() for n in TENSORS}
    meta = {"format": FORMAT, "version": "1", "split": split, "shard": str(shard), "manifest_digest": manifest_digest}
    if encoding:
        if encoding.get("name") != compact.NAME:
            raise ValueError(f"shard {shard}: unknown encoding {encoding.get('name')!r} (this qtarget writes "
                             f"{compact.NAME!r})")
        meta.update(version="2", k=str(tensors["ids"].shape[-1]))
        tensors = _compact_tensors(tensors, encoding, shard)
    meta["sha256"] = tensors_sha256(tensors)
    # one metadata entry holding sorted JSON: safetensors keeps metadata in a hash map, so several
    # entries would be written in a varying order and equal shards would differ in bytes
    meta = {META_KEY: json.dumps(meta, sort_keys=True)}
    final = shard_path(root, split, shard)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, final)
    return final


def _compact_tensors(tensors: dict[str, torch.Tensor], encoding: Mapping[str, Any], shard: int) -> dict[str, torch.Tensor]:
    """Version-1 tensors -> version 2: the tokens as zlib blocks of consecutive rows."""
    ids, log_tail = tensors["ids"].to(torch.int64), tensors["log_tail"].to(torch.float32)
    logprobs = tensors["logprobs"].to(torch.float32)
    try:
        compact.check_encodable(ids, logprobs, log_tail, 1 << (8 * int(encoding["id_bytes"])))
    except ValueError as e:
        raise ValueError(f"shard {shard}: {e}") from None
    off = tensors["row_offsets"]
    cuts = compact.blocks(off, int(encoding["block_tokens"]))
    streams, sizes = [], [0]
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        a, b = int(off[r0]), int(off[r1])
        streams.append(compact.encode_block(tensors["positions"][a:b], ids[a:b], logprobs[a:b], log_tail[a:b],
                                            1 << (8 * int(encoding["id_bytes"]))))
        sizes.append(sizes[-1] + len(streams[-1]))
    data = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8) if sizes[-1] else torch.zeros(0, dtype=torch.uint8)
    return {"row_index": tensors["row_index"], "row_fingerprint": tensors["row_fingerprint"], "row_offsets": off,
            "block_rows": torch.tensor(cuts, dtype=torch.int64), "block_bytes": torch.tensor(sizes, dtype=torch.int64),
            "data": data}


@dataclass
class ShardIndex:
    """A shard's header and index tensors (read at open; the big tensors stay on disk)."""

    path: Path
    sha256: str
    row_index: torch.Tensor  # [R] int64
    row_fingerprint: torch.Tensor  # [R] int64
    row_offsets: torch.Tensor  # [R + 1] int64
    shapes: dict[str, tuple[int, ...]]
    version: int = 1
    k: int = 0  # entries per token
    block_rows: torch.Tensor | None = None  # version 2: [B + 1] int64
    block_bytes: torch.Tensor | None = None  # version 2: [B + 1] int64


def _fix(path: Path) -> str:
    return f"delete {path} and re-run `qtarget teacher-cache` with the same arguments to rebuild it"


def open_shard(path: Path, *, split: str, shard: int, manifest_digest: str) -> ShardIndex:
    """Read one shard's header and index. Raises CorruptShardError naming the file and what is wrong:
    unreadable, wrong format / version / split / shard, built for another manifest, or inconsistent shapes."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            version = meta.get("version")
            if version not in [str(v) for v in VERSIONS]:
                raise CorruptShardError(f"teacher cache shard {path}: metadata `version` is {version!r}, expected one "
                                        f"of {', '.join(repr(str(v)) for v in VERSIONS)}: {_fix(path)}")
            wanted = shard_tensor_names(int(version))
            names = set(f.keys())
            missing = [n for n in wanted if n not in names]
            if missing:
                raise CorruptShardError(f"teacher cache shard {path} lacks tensor(s) {', '.join(missing)}: {_fix(path)}")
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in wanted}
            small = ("row_index", "row_fingerprint", "row_offsets") + (("block_rows", "block_bytes") if version == "2" else ())
            index = {n: f.get_tensor(n) for n in small}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, CorruptShardError):
            raise
        raise CorruptShardError(f"teacher cache shard {path} cannot be read ({e}): {_fix(path)}") from None
    expected = {"format": FORMAT, "split": split, "shard": str(shard)}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CorruptShardError(f"teacher cache shard {path}: metadata `{key}` is {meta.get(key)!r}, "
                                    f"expected {value!r}: {_fix(path)}")
    if meta.get("manifest_digest") != manifest_digest:
        raise CorruptShardError(f"teacher cache shard {path} was built for another manifest (digest "
                                f"{meta.get('manifest_digest')!r}, the folder's manifest has {manifest_digest!r}): "
                                f"{_fix(path)}")
    if version == "1":
        k = shapes["ids"][-1] if len(shapes["ids"]) == 2 else -1
    else:
        k = int(meta["k"]) if str(meta.get("k", "")).isdigit() else -1
    out = ShardIndex(path, str(meta.get("sha256")), index["row_index"], index["row_fingerprint"], index["row_offsets"],
                     shapes, version=int(version), k=k, block_rows=index.get("block_rows"),
                     block_bytes=index.get("block_bytes"))
    _check_index(out)
    return out


def read_block(handle, ix: ShardIndex, block: int, encoding: Mapping[str, Any]):
    """Decode block `block` of a version-2 shard (`handle`: its open safe_open file): positions [m],
    ids [m, k], logprobs [m, k], log_tail [m] of the block's rows. CorruptShardError if it does not decode."""
    r0, r1 = int(ix.block_rows[block]), int(ix.block_rows[block + 1])
    m = int(ix.row_offsets[r1]) - int(ix.row_offsets[r0])
    x0, x1 = int(ix.block_bytes[block]), int(ix.block_bytes[block + 1])
    blob = handle.get_slice("data")[x0:x1].numpy().tobytes()
    try:
        return compact.decode_block(blob, m, ix.k, 1 << (8 * int(encoding["id_bytes"])), int(encoding["code_bits"]))
    except ValueError as e:
        raise CorruptShardError(f"teacher cache shard {ix.path}: block {block} (rows {r0}-{r1 - 1}) does not decode "
                                f"({e}): {_fix(ix.path)}") from None


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
    problems = []
    if tuple(ix.row_fingerprint.shape) != (R,):
        problems.append(f"row_fingerprint has shape {tuple(ix.row_fingerprint.shape)}, expected ({R},)")
    off = ix.row_offsets
    if ix.version == 1:
        m = sh["positions"][0] if len(sh["positions"]) == 1 else -1
        if len(sh["positions"]) != 1:
            problems.append(f"positions has shape {sh['positions']}, expected (m,)")
    else:
        m = int(off[-1]) if off.numel() else -1
    if tuple(off.shape) != (R + 1,) or int(off[0]) != 0 or int(off[-1]) != m or bool((off[1:] < off[:-1]).any()):
        problems.append(f"row_offsets must be non-decreasing from 0 to {m} with {R + 1} entries")
    if ix.version == 1:
        if len(sh["ids"]) != 2 or sh["ids"][0] != m:
            problems.append(f"ids has shape {sh['ids']}, expected ({m}, k)")
        elif sh["logprobs"] != sh["ids"]:
            problems.append(f"logprobs has shape {sh['logprobs']}, expected {sh['ids']}")
        if sh["log_tail"] != (m,):
            problems.append(f"log_tail has shape {sh['log_tail']}, expected ({m},)")
    else:
        rows, nbytes = ix.block_rows, ix.block_bytes
        if ix.k < 1:
            problems.append("metadata `k` must be a positive integer")
        if rows.dim() != 1 or rows.numel() < 2 or int(rows[0]) != 0 or int(rows[-1]) != R or \
                bool((rows[1:] < rows[:-1]).any()):
            problems.append(f"block_rows must be non-decreasing from 0 to {R}")
        n = sh["data"][0] if len(sh["data"]) == 1 else -1
        if tuple(nbytes.shape) != tuple(rows.shape) or int(nbytes[0]) != 0 or int(nbytes[-1]) != n or \
                bool((nbytes[1:] < nbytes[:-1]).any()):
            problems.append(f"block_bytes must be non-decreasing from 0 to {n} (data's length), one per block_rows entry")
    if problems:
        raise CorruptShardError(f"teacher cache shard {ix.path}: {'; '.join(problems)}: {_fix(ix.path)}")
