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
The header's key and kernel name must equal the request's: a valid entry of
another kernel at this path is treated like a corrupt one.

Shared caches (one deployment cache for several users): entries and lock files
get the umask's permissions (0644 under umask 022), not mkstemp's 0600; an entry
the process cannot read is reported (CacheUnreadable), never deleted; offline
(EPKERN_JIT=0) nothing in the cache is ever deleted or written. The compile
lock is an flock on `<entry>.lock`, holding the holder's pid, host and start
time; a waiter gives up after EPKERN_LOCK_TIMEOUT_S with CacheLockTimeout naming
it. A cache directory that cannot be written (a file, read-only, an unwritable
HOME) raises CacheUnwritable naming EPKERN_CACHE_DIR; with JIT on, jit.build
then warns once and compiles into a private temporary cache instead.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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


class CacheUnusable(OSError):
    """The cache directory or an entry cannot be used; the message names EPKERN_CACHE_DIR and what to do."""


class CacheUnreadable(CacheUnusable):
    """An entry exists but this process may not read it (another user's, mode 0600): kept, not corrupt."""


class CacheUnwritable(CacheUnusable):
    """The cache directory cannot be created or written (a file in its place, read-only, no permission)."""


class CacheLockTimeout(TimeoutError):
    """Another process held a compile lock for longer than EPKERN_LOCK_TIMEOUT_S."""


_FIX = ("set EPKERN_CACHE_DIR to a directory you can write (default ~/.cache/epkern), "
        "or fix that directory's permissions")


def _where() -> str:
    raw = os.environ.get("EPKERN_CACHE_DIR", "").strip()
    return f"EPKERN_CACHE_DIR={raw}" if raw else f"the default cache {knobs.cache_dir()} (EPKERN_CACHE_DIR is unset)"


def kernels_root(root: Path | None = None) -> Path:
    return (knobs.cache_dir() if root is None else Path(root)) / "kernels"


def entry_path(symbol: str, key: str, nvrtc: str, root: Path | None = None) -> Path:
    return kernels_root(root) / symbol / f"{key[:32]}-nvrtc{nvrtc}.cubin"


def _parse(path: Path, data: bytes, key: str | None, name: str | None) -> CacheEntry:
    header, sep, payload = data.partition(b"\n")
    if not sep:
        raise CorruptEntry(f"{path}: no header")
    try:
        meta = json.loads(header)
    except ValueError as exc:
        raise CorruptEntry(f"{path}: bad header ({exc})") from None
    if not isinstance(meta, dict):
        raise CorruptEntry(f"{path}: bad header (not a JSON object)")
    if meta.get("size") != len(payload) or meta.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise CorruptEntry(f"{path}: checksum mismatch (truncated or corrupted)")
    if (key is not None and meta.get("key") != key) or (name is not None and meta.get("name") != name):
        raise CorruptEntry(f"{path}: holds kernel {meta.get('name')!r} (key {str(meta.get('key'))[:16]}), "
                           f"not the requested {name!r} (key {str(key)[:16]})")
    return CacheEntry(path=path, cubin=payload, meta=meta)


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes, None if it does not exist; CacheUnreadable if it exists but cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a file where a folder of the path should be
        return None
    except OSError as exc:
        raise CacheUnreadable(errno.EACCES if isinstance(exc, PermissionError) else exc.errno,
                              f"epkern cache: cannot read {path} ({exc.strerror or exc}); the entry is kept. "
                              f"Make it readable to this user (its owner can run chmod a+r on it and a+rx on "
                              f"its folders), or set EPKERN_CACHE_DIR to a cache of your own "
                              f"(now: {_where()})") from None


def load(path: Path, *, key: str | None = None, name: str | None = None,
         discard: bool | None = None) -> CacheEntry | None:
    """The entry at path, or None if missing, corrupt or another kernel's (key / name given and
    different from the header's). A corrupt entry is logged and, if discard (default: JIT on),
    removed. An unreadable one raises CacheUnreadable and is kept."""
    data = _read_bytes(path)
    if data is None:
        return None
    try:
        return _parse(path, data, key, name)
    except CorruptEntry as exc:
        if discard is None:
            discard = knobs.jit_enabled()
        _log.warning("epkern cache: %s %s", "discarding" if discard else "ignoring", exc)
        if discard:
            try:
                path.unlink()
            except OSError:
                pass
        return None


def _umask() -> int:
    """The process umask (read from /proc so no thread sees a changed one; else set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of new entries and lock files: what open() would give, 0666 minus the umask."""
    return 0o666 & ~_umask()


def prepare_dir(folder: Path) -> None:
    """Create folder (and parents) and check it can be written; CacheUnwritable otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise CacheUnwritable(errno.ENOTDIR, f"epkern cache: {blocker} is a file, not a directory, so the kernel "
                              f"cache cannot live under it ({_where()}); remove the file or {_FIX}") from None
    except OSError as exc:
        raise CacheUnwritable(exc.errno, f"epkern cache: cannot create {folder} ({exc.strerror or exc}; "
                              f"{_where()}); {_FIX}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CacheUnwritable(errno.EACCES, f"epkern cache: {folder} is not writable by this user ({_where()}); "
                              f"{_FIX}")


def store(path: Path, cubin: bytes, meta: dict) -> CacheEntry:
    """Atomically write an entry: temp file in the same folder, fsync, os.replace. The entry gets
    the umask's permissions (mkstemp alone would make it 0600, unreadable to other users)."""
    prepare_dir(path.parent)
    meta = dict(meta, size=len(cubin), sha256=hashlib.sha256(cubin).hexdigest())
    header = json.dumps(meta, sort_keys=True).encode()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(header + b"\n" + cubin)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise CacheUnwritable(exc.errno, f"epkern cache: cannot write {path} ({exc.strerror or exc}; "
                              f"{_where()}); {_FIX}") from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return CacheEntry(path=path, cubin=cubin, meta=meta, fresh=True)


class CompileLock:
    """Exclusive flock on `<entry>.lock` across processes (and threads: one open file each).

    The holder writes "pid P on host H since T" into the lock file, so a waiter that gives up
    after `timeout` seconds (EPKERN_LOCK_TIMEOUT_S) can name it. A holder that dies releases the
    lock with its file descriptors; one that is stopped keeps it, hence the timeout. A lock file
    of another user that this one may not write is locked read-only (flock needs no write
    access; the holder is then not recorded)."""

    def __init__(self, path: Path, timeout: float | None = None):
        self.path = Path(str(path) + ".lock")
        self.timeout = knobs.lock_timeout_s() if timeout is None else float(timeout)
        self._fd: int | None = None
        self._writable = False

    def _open(self) -> None:
        prepare_dir(self.path.parent)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # umask applies
            self._writable = True
        except PermissionError:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise CacheUnwritable(exc.errno, f"epkern cache: cannot open the compile lock {self.path} "
                                      f"({exc.strerror or exc}; {_where()}); {_FIX}") from None

    def holder(self) -> str:
        try:
            text = os.pread(self._fd, 512, 0).decode(errors="replace").strip() if self._fd is not None else ""
        except OSError:
            text = ""
        return text or "an unknown process (it did not record itself)"

    def __enter__(self) -> "CompileLock":
        self._open()
        deadline = time.monotonic() + self.timeout
        pause = 0.01
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    self._close()
                    raise CacheLockTimeout(
                        f"epkern cache: waited {self.timeout:g} s for the compile lock {self.path}, held by "
                        f"{holder}. If that process is stuck or stopped, end it (the lock frees when it exits); "
                        f"if its compile is only slow, raise EPKERN_LOCK_TIMEOUT_S") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.25)
        if self._writable:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            try:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, f"pid {os.getpid()} on host {socket.gethostname()} since {stamp}\n".encode(), 0)
            except OSError:
                pass
        return self

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc) -> None:
        try:
            if self._writable:
                try:
                    os.ftruncate(self._fd, 0)
                except OSError:
                    pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._close()


def lock_for(path: Path, timeout: float | None = None) -> CompileLock:
    return CompileLock(path, timeout)


_fallback: Path | None = None
_fallback_lock = threading.Lock()


def fallback_root(reason: str) -> Path:
    """A private temporary cache for this process's compiles when the configured one cannot be
    used; the first call logs one warning with the reason."""
    global _fallback
    with _fallback_lock:
        if _fallback is not None:
            return _fallback
        _fallback = Path(tempfile.mkdtemp(prefix="epkern-cache-"))
        _log.warning("%s\nepkern: compiling into the temporary cache %s for this process instead (kernels are "
                     "rebuilt by every process until EPKERN_CACHE_DIR names a usable directory)", reason, _fallback)
    return _fallback


def find_any_compiler(symbol: str, key: str, name: str | None = None) -> CacheEntry | None:
    """Offline lookup: a valid entry for this source key from any NVRTC version (newest first).
    Nothing is deleted. Raises CacheUnreadable if entries exist but none can be read, and
    CacheUnwritable if the cache directory is a file."""
    root = knobs.cache_dir()
    if root.exists() and not root.is_dir():
        raise CacheUnwritable(errno.ENOTDIR, f"epkern cache: {root} is a file, not a directory ({_where()}); "
                              f"point EPKERN_CACHE_DIR to the directory holding the precompiled kernels")
    folder = kernels_root() / symbol
    if not folder.is_dir():
        return None

    def version_of(p: Path) -> tuple[int, ...]:
        tail = p.stem.rsplit("-nvrtc", 1)[-1]
        return tuple(int(x) for x in tail.split(".") if x.isdigit())

    try:
        candidates = sorted(folder.glob(f"{key[:32]}-nvrtc*.cubin"), key=version_of, reverse=True)
    except OSError as exc:
        raise CacheUnreadable(exc.errno, f"epkern cache: cannot list {folder} ({exc.strerror or exc}; "
                              f"{_where()}); make it readable (chmod a+rx)") from None
    unreadable = None
    for path in candidates:
        try:
            entry = load(path, key=key, name=name, discard=False)
        except CacheUnreadable as exc:
            unreadable = exc
            continue
        if entry is not None:
            return entry
    if unreadable is not None:
        raise unreadable
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
        try:
            shutil.rmtree(root)
        except OSError as exc:
            raise CacheUnwritable(exc.errno, f"epkern cache: cannot remove {exc.filename or root} "
                                  f"({exc.strerror or exc}; {_where()}); {_FIX}") from None
    return n
