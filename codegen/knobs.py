"""Every EPKERN_* environment variable, read in one place and parsed strictly.

| variable | meaning | default |
|---|---|---|
| EPKERN_CACHE_DIR | where compiled cubins are stored | ~/.cache/epkern |
| EPKERN_JIT | 0 = offline: never compile, only load from the cache | 1 |
| EPKERN_ARCH | target architecture, e.g. sm_90a (overrides the detected GPU) | current GPU, else sm_90a |
| EPKERN_VERBOSE | 1 = log compiles and cache hits to stderr | 0 |
| EPKERN_NVRTC_EXTRA_OPTIONS | extra NVRTC options, space separated (part of the cache key) | "" |
| EPKERN_TIMEOUT_S | seconds a kernel waits for a peer before raising (finite, at most 86400) | 100 |
| EPKERN_LOCK_TIMEOUT_S | seconds a process waits for another's compile of the same kernel before raising (naming the holder) | 600 |
| EPKERN_RANKS_PER_NODE | ranks per node for multi-node EP (1 = each GPU its own node, for tests on one machine) | LOCAL_WORLD_SIZE, else host names |
| EPKERN_LPLB_FUSED | 0 = Planner.run launches count, solve and map separately instead of one cooperative kernel | 1 |
| EPKERN_CHECK_VALUES | 1 = index values (expert ids) are checked on the device by the kernels that read them, raised at the next check (epkern.check_errors); 2 = also before launch on the host (one sync per call; skipped during CUDA-graph capture); 0 = off | 1 |
| EPKERN_TUNED_CONFIG | a tuned-config JSON from `epkern tune`: Buffer.get_dispatch_config/get_combine_config read it | unset (built-in defaults) |
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


_environ_data = getattr(os.environ, "_data", None)  # os.environ's own dict (POSIX: bytes keys and values)
_encoded_keys: dict = {}


def raw_env(name: str):
    """os.environ's raw value of `name` (bytes on POSIX; None when unset), for knobs read on every eager
    call: a lookup in os.environ's own dict skips the str <-> bytes work of os.environ.get (0.8 of
    a Buffer call's 6.6 us of Python on the CPU machine). Follows os.environ's changes, which write
    that dict. Falls back to os.environ.get where os.environ has no such dict."""
    if _environ_data is None:
        return os.environ.get(name)
    key = _encoded_keys.get(name)
    if key is None:
        key = _encoded_keys[name] = os.environ.encodekey(name)
    return _environ_data.get(key)


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


# Longest accepted timeout: a day. Larger values (1e30, inf) would overflow the kernels' uint64
# nanosecond deadlines or amount to no timeout at all.
MAX_TIMEOUT_S = 86400.0


def env_float(name: str, default: float, hi: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={raw!r}: expected a finite positive number")
    if hi is not None and value > hi:
        raise ValueError(f"{name}={raw!r}: at most {hi:g} is allowed")
    return value


def check_timeout_s(name: str, value) -> float:
    """A timeout argument in seconds: a finite number in (0, MAX_TIMEOUT_S]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}: expected a number of seconds")
    value = float(value)
    if not math.isfinite(value) or value <= 0 or value > MAX_TIMEOUT_S:
        raise ValueError(f"{name}={value!r}: expected a finite number of seconds in (0, {MAX_TIMEOUT_S:g}]")
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
    return env_float("EPKERN_TIMEOUT_S", 100.0, MAX_TIMEOUT_S)


def lock_timeout_s() -> float:
    return env_float("EPKERN_LOCK_TIMEOUT_S", 600.0, MAX_TIMEOUT_S)


def ranks_per_node() -> int | None:
    raw = os.environ.get("EPKERN_RANKS_PER_NODE", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"EPKERN_RANKS_PER_NODE={raw!r}: expected a positive whole number")
    return int(raw)


def check_values() -> bool:
    """Value checks of any kind (device-side or host-side) are on."""
    return check_level() >= 1


def check_level() -> int:
    """EPKERN_CHECK_VALUES as a level: 0 off, 1 device-side (default), 2 device-side and host-side."""
    return parse_check_level(os.environ.get("EPKERN_CHECK_VALUES"))


@functools.lru_cache(maxsize=64)
def parse_check_level(raw: str | None) -> int:
    if raw is not None and raw.strip() == "2":
        return 2
    try:
        return int(_parse_bool("EPKERN_CHECK_VALUES", raw, True))
    except ValueError:
        raise ValueError(f"EPKERN_CHECK_VALUES={raw!r}: expected 0 (off), 1 (on the device, the default) or 2 "
                         "(also on the host before each launch)") from None


def lplb_fused() -> bool:
    """Planner.run as one cooperative kernel (solver/run_kernel.py) where it applies."""
    return env_bool("EPKERN_LPLB_FUSED", True)


def tuned_config_path() -> Path | None:
    raw = os.environ.get("EPKERN_TUNED_CONFIG", "").strip()
    return Path(raw).expanduser() if raw else None


