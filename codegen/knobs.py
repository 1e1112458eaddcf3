"""Every EPKERN_* environment variable, read in one place and parsed strictly.

| variable | meaning | default |
|---|---|---|
| EPKERN_CACHE_DIR | where compiled cubins are stored | ~/.cache/epkern |
| EPKERN_JIT | 0 = offline: never compile, only load from the cache | 1 |
| EPKERN_ARCH | target architecture, e.g. sm_90a (overrides the detected GPU) | current GPU, else sm_90a |
| EPKERN_VERBOSE | 1 = log compiles and cache hits to stderr | 0 |
| EPKERN_NVRTC_EXTRA_OPTIONS | extra NVRTC options, space separated (part of the cache key) | "" |
| EPKERN_TIMEOUT_S | seconds a kernel waits for a peer before raising | 100 |
| EPKERN_CHECK_VALUES | 1 = check index values (expert ids in range) before launch; costs one host sync; skipped during CUDA-graph capture | 1 |
| EPKERN_TUNED_CONFIG | a tuned-config JSON from `epkern tune`: Buffer.get_dispatch_config/get_combine_config read it | unset (built-in defaults) |
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    return _parse_bool(name, os.environ.get(name), default)


@functools.lru_cache(maxsize=256)
def _parse_bool(name: str, raw: str | None, default: bool) -> bool:
    """Parsed once per raw value: EPKERN_CHECK_VALUES is read on every eager call (bad values are
    not cached, so they raise every time)."""
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of {sorted(_TRUE | _FALSE)}")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: expected a positive number")
    return value


_ARCH_RE = re.compile(r"^sm_(\d{2,3})([a-z]?)$")


def validate_arch(arch: str) -> str:
    """Return arch if it names a real SASS target like sm_90a or sm_100, else raise."""
    if not isinstance(arch, str) or not _ARCH_RE.match(arch):
        raise ValueError(f"arch={arch!r}: expected a SASS target such as 'sm_90a', 'sm_90' or 'sm_100a'")
    return arch


def cache_dir() -> Path:
    raw = os.environ.get("EPKERN_CACHE_DIR", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "epkern"


def jit_enabled() -> bool:
    return env_bool("EPKERN_JIT", True)


def arch_override() -> str | None:
    raw = os.environ.get("EPKERN_ARCH", "").strip()
    return validate_arch(raw) if raw else None


def verbose() -> bool:
    return env_bool("EPKERN_VERBOSE", False)


def extra_nvrtc_options() -> tuple[str, ...]:
    return tuple(os.environ.get("EPKERN_NVRTC_EXTRA_OPTIONS", "").split())


def peer_timeout_s() -> float:
    return env_float("EPKERN_TIMEOUT_S", 100.0)


def check_values() -> bool:
    return env_bool("EPKERN_CHECK_VALUES", True)


def tuned_config_path() -> Path | None:
    raw = os.environ.get("EPKERN_TUNED_CONFIG", "").strip()
    return Path(raw).expanduser() if raw else None


def codegen_environment() -> dict[str, str]:
    """Environment that changes generated code; it is part of every cache key."""
    return {"EPKERN_NVRTC_EXTRA_OPTIONS": " ".join(extra_nvrtc_options())}
