"""Where rows come from: a local file (jsonl / json / parquet / csv), a `datasets.save_to_disk`
folder, a hub dataset name, or rows already in memory. Returns a `datasets.Dataset`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import datasets

from qtarget.models.load import looks_like_path

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: Any, *, split: str = "train", name: str | None = None) -> datasets.Dataset:
    """A `datasets.Dataset` of raw rows from `source`:
    - a `datasets.Dataset` (returned as is) or a `DatasetDict` (its `split`),
    - a list of dicts,
    - a path to a .jsonl / .json / .parquet / .csv file,
    - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`,
    - otherwise a hub dataset id, loaded with `datasets.load_dataset(source, name, split=split)`.
    """
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, str(source))
    if isinstance(source, (list, tuple)):
        rows = list(source)
        if rows and not all(isinstance(r, Mapping) for r in rows):
            bad = next(i for i, r in enumerate(rows) if not isinstance(r, Mapping))
            raise ValueError(f"dataset row {bad} is a {type(rows[bad]).__name__}, expected a dict of columns")
        return datasets.Dataset.from_list([dict(r) for r in rows])
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"dataset must be a path, a hub name, a list of dicts or a datasets.Dataset, "
                         f"got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                or (path / "state.json").exists()):
            raise ValueError(f"dataset folder {str(path)!r} is not a `save_to_disk` folder "
                             f"(no dataset_info.json / dataset_dict.json / state.json inside)")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, split, str(path))
        return loaded
    if path.suffix.lower() in FILE_BUILDERS:
        if not path.exists():
            raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
        if path.stat().st_size == 0:
            raise ValueError(f"dataset file {str(path)!r} is empty")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"dataset file {str(path)!r} cannot be read by this user (permission denied): "
                                  f"make it readable (chmod +r) or pass a copy you can read")
        builder = FILE_BUILDERS[path.suffix.lower()]
        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a bar per small local file is noise (and precedes any error)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - datasets wraps parse errors in its own classes
            expected = {".jsonl": "one JSON object per line", ".json": "a JSON list of objects or JSON lines",
                        ".csv": "comma-separated columns with a header row", ".parquet": "a Parquet file"}
            raise ValueError(f"dataset file {str(path)!r} cannot be read as {path.suffix.lower()[1:]} (expected "
                             f"{expected.get(path.suffix.lower(), 'rows')}): {_cause(e)}") from None
        finally:
            if not quiet:
                datasets.enable_progress_bars()
    if path.exists():
        raise ValueError(f"dataset file {str(path)!r} has an unsupported extension {path.suffix!r}; "
                         f"expected one of {', '.join(FILE_BUILDERS)} or a save_to_disk folder")
    if looks_like_path(str(source)):
        raise FileNotFoundError(f"dataset {str(source)!r} does not exist (no such file or folder)")
    try:
        return datasets.load_dataset(str(source), name, split=split)
    except (OSError, ValueError) as e:  # offline, not on the hub (DatasetNotFoundError), no such split
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = " (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: only datasets in the local cache load)" if offline else ""
        raise ValueError(f"dataset {str(source)!r} is not a local file or folder, and loading it as a hub dataset "
                         f"failed: {_cause(e)}{hint}") from None


def _cause(error: BaseException) -> str:
    """The innermost message of a (chained) library error, on one line."""
    while error.__cause__ is not None and str(error.__cause__).strip():
        error = error.__cause__
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _pick_split(dd: datasets.DatasetDict, split: str, where: str) -> datasets.Dataset:
    if split not in dd:
        raise ValueError(f"dataset {where!r} has no split {split!r}; available splits: {', '.join(dd)}")
    return dd[split]


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines (a small helper for examples and tests)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path
