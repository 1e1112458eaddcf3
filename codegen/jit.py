"""Spec -> cubin: render, look up the cache, compile once under a lock, store."""
from __future__ import annotations

import logging
import time

from . import cache, compiler, knobs

_log = logging.getLogger("epkern.codegen")


class MissingKernelError(RuntimeError):
    """Offline mode (EPKERN_JIT=0) and the kernel is not in the cache."""

    def __init__(self, spec, arch: str, hint: str):
        self.spec = spec
        self.arch = arch
        self.hint = hint
        super().__init__(
            f"kernel {spec.name} for {arch} is not in the cache {knobs.cache_dir()} and EPKERN_JIT=0 forbids "
            f"compiling it.\nspec: {spec}\nbuild it ahead with: {hint}"
        )


def precompile_hint(spec, arch: str) -> str:
    return f"epkern precompile --arch {arch}  (with a --config listing this shape if it is not in the default deployment)"


def build(spec, arch: str | None = None) -> cache.CacheEntry:
    """Return the cache entry holding spec's cubin for arch, compiling it if allowed and needed."""
    arch = compiler.target_arch(arch)
    source = spec.render()
    options = compiler.compile_options(arch, tuple(getattr(spec, "extra_options", lambda: ())()))
    key = cache.source_key(source, options, arch)
    if not knobs.jit_enabled():
        entry = cache.find_any_compiler(spec.symbol, key, spec.name)
        if entry is None:
            raise MissingKernelError(spec, arch, precompile_hint(spec, arch))
        return entry
    nvrtc = compiler.nvrtc_version()
    path = cache.entry_path(spec.symbol, key, nvrtc)
    try:
        return _load_or_compile(spec, source, options, arch, nvrtc, key, path)
    except cache.CacheUnusable as exc:
        # an unreadable entry or an unwritable cache: compile into a private temporary one (one warning)
        fallback = cache.entry_path(spec.symbol, key, nvrtc, root=cache.fallback_root(str(exc)))
        return _load_or_compile(spec, source, options, arch, nvrtc, key, fallback)


def _load_or_compile(spec, source, options, arch, nvrtc, key, path) -> cache.CacheEntry:
    entry = cache.load(path, key=key, name=spec.name)
    if entry is not None:
        return entry
    with cache.lock_for(path):
        entry = cache.load(path, key=key, name=spec.name)  # another process may have built it while we waited
        if entry is not None:
            return entry
        start = time.perf_counter()
        compiled = compiler.compile_cubin(spec, source, options)
        seconds = time.perf_counter() - start
        if knobs.verbose():
            _log.warning("epkern: compiled %s for %s in %.2fs", spec.name, arch, seconds)
        meta = {"name": spec.name, "spec": str(spec), "arch": arch, "nvrtc": nvrtc,
                "epkern": cache.epkern_version(), "key": key, "compile_s": round(seconds, 4)}
        return cache.store(path, compiled.cubin, meta)
