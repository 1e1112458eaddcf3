"""Spec -> cubin: render, look up the cache, compile once under a lock, store."""
from __future__ import annotations

import logging
import os
import shlex
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
    """A command that builds the kernel (JIT on: precompiling compiles), in the same cache."""
    raw = os.environ.get("EPKERN_CACHE_DIR", "").strip()
    command = f"EPKERN_JIT=1 {f'EPKERN_CACHE_DIR={shlex.quote(raw)} ' if raw else ''}epkern precompile --arch {arch}"
    try:
        from epkern.deployment import Deployment, specs_for

        default = spec in specs_for([Deployment()])
    except Exception:  # the hint must never hide the error it is part of
        default = False
    if default:
        return command
    return (f"{command} --config deploy.json  (deploy.json: this model's shapes, e.g. {{\"hidden\": 7168, "
            f"\"num_experts\": 256, \"num_topk\": 8, \"ep_sizes\": [8]}}; the default is DeepSeek-V3 at EP 2, 4, 8)")


def build(spec, arch: str | None = None) -> cache.CacheEntry:
    """Return the cache entry holding spec's cubin for arch, compiling it if allowed and needed."""
    arch = compiler.target_arch(arch)
    source = spec.render()
    options = compiler.compile_options(arch)
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
