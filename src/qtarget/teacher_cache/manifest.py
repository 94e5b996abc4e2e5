"""The manifest of a teacher cache: what was cached (teacher, tokenizer, data) and how (k,
temperature, tokenisation settings), so a cache is only ever used for the training run it fits.

`Manifest.differences(other)` lists the keys that differ; training and a resumed build refuse a
cache whose manifest differs in any key that changes the cached numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtarget.teacher_cache import encoding as compact
from qtarget.teacher_cache.schema import COMPACT, ENCODINGS, FORMAT, MANIFEST, VERSIONS, format_version

# QTargetConfig keys that decide the tokenised training rows (`prepare_data`'s arguments).
DATA_KEYS = ("dataset", "dataset_config", "dataset_split", "max_rows", "eval_dataset", "eval_fraction",
             "max_length", "response_only", "chat_template", "packing", "seed")
# manifest keys that describe how a cache was made without changing its numbers: left out of the digest
# and of `differences`, so several engines (or servers of one teacher) can build and resume one cache
INFORMATIONAL = ("engine",)


@dataclass
class SplitInfo:
    """One tokenised split (train / eval): row count, supervised-token count, data fingerprint."""

    rows: int
    supervised_tokens: int
    data_fingerprint: str


@dataclass
class Manifest:
    teacher: dict[str, Any]  # name, revision, weights (fingerprint)
    tokenizer_fingerprint: str
    vocab_size: int  # the student's vocabulary: ids lie in [0, vocab_size), pi_T is normalised over it
    top_k: int
    temperature: float
    logprob_dtype: str
    rows_per_shard: int
    splits: dict[str, SplitInfo]
    settings: dict[str, Any] = field(default_factory=dict)  # DATA_KEYS values, None when unknown
    student: str | None = None  # informational: the model whose tokenizer defined the tokens
    # informational: the engine that ran the teacher (name, version, request settings); absent: hf
    engine: dict[str, Any] = field(default_factory=dict)
    # how shards store the top-k: the compact encoding's parameters (format version 2); empty for version 1
    encoding: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int | None = None  # format_version(logprob_dtype) when not given

    def __post_init__(self) -> None:
        if self.version is None:
            self.version = format_version(self.logprob_dtype)
        if self.logprob_dtype == COMPACT and not self.encoding:
            self.encoding = compact.spec(self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["encoding"]:
            del d["encoding"]  # a version-1 manifest reads (and digests) as before
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> "Manifest":
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a qtarget teacher cache (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") not in VERSIONS:
            raise ValueError(f"{where}: teacher cache format version {data.get('version')} is not supported "
                             f"(this qtarget reads versions {', '.join(map(str, VERSIONS))})")
        if data.get("logprob_dtype") in ENCODINGS and data["version"] != format_version(data["logprob_dtype"]):
            raise ValueError(f"{where}: logprob_dtype {data['logprob_dtype']!r} is stored by format version "
                             f"{format_version(data['logprob_dtype'])}, the manifest says version {data['version']}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in data and n not in ("settings", "student", "encoding") + INFORMATIONAL)
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        data = {k: v for k, v in data.items() if k in names}
        data["splits"] = {k: SplitInfo(**v) for k, v in data["splits"].items()}
        return cls(**data)

    def digest(self) -> str:
        """sha256 (16 hex chars) of everything but the informational `student` name and `engine`."""
        d = self.to_dict()
        d.pop("student", None)
        for key in INFORMATIONAL:
            d.pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "Manifest") -> list[tuple[str, Any, Any]]:
        """(key, self's value, other's value) for every differing (dotted) key but `student` and `engine`."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        keys = sorted(set(a) | set(b))
        skip = ("student",) + INFORMATIONAL
        return [(k, a.get(k), b.get(k)) for k in keys if k.split(".")[0] not in skip and a.get(k) != b.get(k)]

    def save(self, folder: Path) -> None:
        """Write manifest.json atomically (temp file + os.replace)."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder / MANIFEST)

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a teacher cache: {MANIFEST} is missing "
                                    f"(build one with `qtarget teacher-cache`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): the manifest is corrupted") from None
        return cls.from_dict(data, where=str(path))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def describe(differences: list[tuple[str, Any, Any]], mine: str = "cache", theirs: str = "expected") -> str:
    return "; ".join(f"{k}: {mine} has {a!r}, {theirs} {b!r}" for k, a, b in differences)


def teacher_identity(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """Name, hub revision (when loaded from the hub) and a weights fingerprint of a teacher model.
    The fingerprint hashes every parameter's name, shape, dtype and 4096 evenly strided values
    (computed where the weights live; a different checkpoint changes it)."""
    config = getattr(model, "config", None)
    name = name or getattr(config, "_name_or_path", None) or type(model).__name__
    h = hashlib.sha256()
    with torch.no_grad():
        for pname, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to(device="cpu", dtype=torch.float64)
            h.update(f"{pname}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    revision = getattr(config, "_commit_hash", None)
    return {"name": str(name), "revision": revision, "weights": h.hexdigest()[:16]}
