"""Cache-folder helpers: where the cache lives, file hashes, a cross-process lock, atomic folder writes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "QTARGET_CACHE"


def cache_root() -> Path:
    """The qtarget cache root: ``$QTARGET_CACHE`` if set, else ``$XDG_CACHE_HOME/qtarget`` or ``~/.cache/qtarget``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qtarget"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: Path) -> dict[str, int]:
    """Cheap identity of a file (size, mtime in ns) used to skip re-hashing an unchanged file."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive lock across processes (``fcntl.flock``; on platforms without it, no lock is taken and
    the atomic rename in :func:`atomic_dir` is the only protection)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``final``; on success it replaces ``final`` by rename.

    Readers therefore see either the old complete folder, or the new complete one, never a partial write.
    On error the temporary folder is removed and ``final`` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it the usual folder mode
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def log(msg: str) -> None:
    """Progress message on stderr (the slow, first-time conversions report what they do)."""
    print(f"[qtarget.models] {msg}", file=sys.stderr, flush=True)


MANIFEST = "qtarget-manifest.json"
MANIFEST_FORMAT = 1


def write_manifest(folder: Path, source: Path, files: list[str], extra: dict | None = None) -> None:
    """Record sha256 + size/mtime of the ``source`` file and of ``files`` (names inside ``folder``)."""

    data = {
        "format": MANIFEST_FORMAT,
        "source": {"path": str(source), "sha256": sha256_file(source), **file_stamp(source)},
        "files": {name: {"sha256": sha256_file(folder / name), **file_stamp(folder / name)} for name in files},
        **(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def check_manifest(folder: Path, source: Path, *, full: bool = False) -> str | None:
    """Why ``folder`` is not a valid cache built from ``source``, or None if it is.

    A file whose size and mtime match the manifest is trusted without re-hashing unless ``full``; any other
    file (and the source, when its size/mtime changed) is re-hashed and compared with the recorded sha256.
    """

    mpath = folder / MANIFEST
    if not folder.is_dir():
        return "not built yet"
    try:
        data = json.loads(mpath.read_text())
        src, files = data["source"], data["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"manifest {mpath} missing or unreadable ({type(e).__name__})"
    if data.get("format") != MANIFEST_FORMAT:
        return f"manifest format {data.get('format')!r} != {MANIFEST_FORMAT}"

    def same(path: Path, rec: dict) -> bool:
        if not path.is_file():
            return False
        st = file_stamp(path)
        if not full and st["size"] == rec.get("size") and st["mtime_ns"] == rec.get("mtime_ns"):
            return True
        return st["size"] == rec.get("size") and sha256_file(path) == rec.get("sha256")

    if not same(source, src):
        return f"source {source} differs from the one the cache was built from"
    for name, rec in files.items():
        if not same(folder / name, rec):
            return f"{name} missing or its sha256 does not match the manifest"
    return None
