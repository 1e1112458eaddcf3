"""On-disk cubin cache: complete keys, atomic writes, checksums, one compile per kernel.

Layout: <EPKERN_CACHE_DIR>/kernels/<spec.symbol>/<source_key>-nvrtc<X.Y>.cubin

`source_key` hashes everything that decides the generated code except the
compiler version (schema, epkern version, rendered source, options with
EPKERN_NVRTC_EXTRA_OPTIONS, arch); the NVRTC version completes the key in the file name.
With JIT on, only an entry from the running NVRTC is used; offline
(EPKERN_JIT=0) any NVRTC's entry for the same source key is accepted, so
cubins built ahead on a machine with a newer NVRTC load on the GPU machine.

Each file is one JSON header line (metadata + sha256 of the payload) and the
cubin. Files are written to a temp file, fsynced and renamed; a corrupt or
truncated entry fails its checksum and is removed and rebuilt, never loaded.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import filelock

from . import knobs

SCHEMA_VERSION = 1
_log = logging.getLogger("epkern.codegen")


@functools.lru_cache(maxsize=1)
def epkern_version() -> str:
    """The installed version (part of every key); read once: importlib.metadata scans sys.path."""
    try:
        from importlib.metadata import version

        return version("epkern")
    except Exception:
        return "0+unknown"


def source_key(source: str, options: tuple[str, ...], arch: str) -> str:
    """SHA-256 over labelled parts; the NVRTC version is added by the file name."""
    h = hashlib.sha256()
    parts = {
        "schema": str(SCHEMA_VERSION),
        "epkern": epkern_version(),
        "arch": arch,
        "options": "\x1f".join(options),   # EPKERN_NVRTC_EXTRA_OPTIONS, the only codegen env var, is here
        "source": source,
    }
    for label, value in parts.items():
        h.update(f"{label}:{len(value)}:".encode())
        h.update(value.encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    cubin: bytes
    meta: dict
    fresh: bool = False  # compiled by this call rather than read from disk


class CorruptEntry(Exception):
    pass


def kernels_root() -> Path:
    return knobs.cache_dir() / "kernels"


def entry_path(symbol: str, key: str, nvrtc: str) -> Path:
    return kernels_root() / symbol / f"{key[:32]}-nvrtc{nvrtc}.cubin"


def _read(path: Path) -> CacheEntry:
    data = path.read_bytes()
    header, sep, payload = data.partition(b"\n")
    if not sep:
        raise CorruptEntry(f"{path}: no header")
    try:
        meta = json.loads(header)
    except ValueError as exc:
        raise CorruptEntry(f"{path}: bad header ({exc})") from None
    if meta.get("size") != len(payload) or meta.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise CorruptEntry(f"{path}: checksum mismatch (truncated or corrupted)")
    return CacheEntry(path=path, cubin=payload, meta=meta)


def load(path: Path) -> CacheEntry | None:
    """The entry at path, or None if missing; a corrupt entry is logged and removed."""
    if not path.exists():
        return None
    try:
        return _read(path)
    except (CorruptEntry, OSError) as exc:
        _log.warning("epkern cache: discarding %s", exc)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def store(path: Path, cubin: bytes, meta: dict) -> CacheEntry:
    """Atomically write an entry: temp file in the same folder, fsync, os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, size=len(cubin), sha256=hashlib.sha256(cubin).hexdigest())
    header = json.dumps(meta, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header + b"\n" + cubin)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return CacheEntry(path=path, cubin=cubin, meta=meta, fresh=True)


def lock_for(path: Path) -> filelock.FileLock:
    path.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(path) + ".lock")


def find_any_compiler(symbol: str, key: str) -> CacheEntry | None:
    """Offline lookup: a valid entry for this source key from any NVRTC version (newest first)."""
    folder = kernels_root() / symbol
    if not folder.is_dir():
        return None

    def version_of(p: Path) -> tuple[int, ...]:
        tail = p.stem.rsplit("-nvrtc", 1)[-1]
        return tuple(int(x) for x in tail.split(".") if x.isdigit())

    candidates = sorted(folder.glob(f"{key[:32]}-nvrtc*.cubin"), key=version_of, reverse=True)
    for path in candidates:
        entry = load(path)
        if entry is not None:
            return entry
    return None


def list_entries() -> list[dict]:
    rows = []
    root = kernels_root()
    if not root.is_dir():
        return rows
    for path in sorted(root.glob("*/*.cubin")):
        try:
            header = path.open("rb").readline()
            meta = json.loads(header)
        except (OSError, ValueError):
            meta = {}
        rows.append({"path": str(path), "kernel": meta.get("name", path.parent.name), "arch": meta.get("arch", "?"),
                     "nvrtc": meta.get("nvrtc", "?"), "bytes": path.stat().st_size,
                     "compile_s": meta.get("compile_s")})
    return rows


def total_size() -> int:
    root = knobs.cache_dir()
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def clear() -> int:
    """Remove every cached kernel; returns how many entries were removed."""
    n = len(list_entries())
    root = kernels_root()
    if root.is_dir():
        shutil.rmtree(root)
    return n
