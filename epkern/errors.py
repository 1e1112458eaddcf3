"""Value checks without a host sync: kernels count out-of-range ids, the host raises later.

A kernel that reads every id anyway (layout, the LPLB count) checks each one against its range for
free. A bad id is never used to address memory: the kernel drops it (the layout and the count skip
it, the map writes -1), counts it in a device error word of its call site, and sets one flag in
host-mapped memory. The host reads that flag without any sync (a plain load of pinned memory) at the
start of the next checked epkern call and in `check_errors()`; when it is set, the device is
synchronized (an error path only), the words are read, reset, and DeviceCheckError names the API,
the argument, the kernel, the number of bad ids counted and one of them.

EPKERN_CHECK_VALUES=1 (default): this device-side check. 2: also the eager host check before
each launch (one sync per call: a debugging mode that raises at the bad call itself). 0: off (bad
ids are still dropped, not counted).

Other call sites (a Buffer, the low-latency kernels) use the same words: `site(device, name)`
returns the two pointers to pass to the kernel, and templates/include/errors.cuh.j2 the device side
(`epk_report_bad`); their host-sync points call `raise_pending()`.
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch

from epkern.codegen import knobs

MAX_SITES = 64
WORDS_PER_SITE = 4  # count, bad value low / high 32 bits, unused


class DeviceCheckError(ValueError):
    """Bad values seen by a kernel (see the module docstring): raised by the next check after it."""


def check_level() -> int:
    """EPKERN_CHECK_VALUES as 0, 1 or 2 (codegen.knobs.check_level), read cheaply on every call."""
    raw = knobs.raw_env("EPKERN_CHECK_VALUES")
    level = _levels.get(raw)
    if level is None:  # parsed once per raw value; a bad value raises every time (never stored)
        level = knobs.parse_check_level(raw if raw is None or isinstance(raw, str) else os.environ.decodevalue(raw))
        if len(_levels) < 64:
            _levels[raw] = level
    return level


_levels: dict = {}


class _HostFlag:
    """One int32 in pinned host memory mapped into every device's address space: any kernel that
    counted a bad value sets it to 1; the host reads it with a plain load (no sync)."""

    def __init__(self):
        from cuda.bindings import driver

        flags = driver.CU_MEMHOSTALLOC_PORTABLE | driver.CU_MEMHOSTALLOC_DEVICEMAP
        err, host = driver.cuMemHostAlloc(64, flags)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"epkern: could not allocate the host-mapped error flag: {err}")
        err, dev = driver.cuMemHostGetDevicePointer(host, 0)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"epkern: could not map the error flag into the device: {err}")
        self.host_ptr, self.device_ptr = int(host), int(dev)
        self.word = (ctypes.c_int32 * 1).from_address(self.host_ptr)
        self.word[0] = 0


class _DeviceWords:
    """Per device: [MAX_SITES, WORDS_PER_SITE] int32 in device memory and the site names."""

    def __init__(self, device: int):
        self.device = device
        self.words = torch.zeros(MAX_SITES * WORDS_PER_SITE, dtype=torch.int32, device=torch.device("cuda", device))
        self.names: list[str] = []
        self.index: dict[str, int] = {}


_lock = threading.Lock()
_flag: _HostFlag | None = None
_devices: dict[int, _DeviceWords] = {}


def site(device: int, name: str) -> tuple[int, int]:
    """(error words pointer, host flag device pointer) for the call site `name` on a CUDA device,
    made on first use (call it when a launch plan is built, not per call). `name` says what is
    checked, e.g. "get_dispatch_layout: topk_idx (layout_e256_r8_k8) outside [-1, 256)"."""
    global _flag
    with _lock:
        if _flag is None:
            _flag = _HostFlag()
        words = _devices.get(device)
        if words is None:
            words = _devices[device] = _DeviceWords(device)
        i = words.index.get(name)
        if i is None:
            if len(words.names) >= MAX_SITES:
                raise RuntimeError(f"epkern: more than {MAX_SITES} checked call sites on cuda:{device}")
            i = words.index[name] = len(words.names)
            words.names.append(name)
        return words.words.data_ptr() + 4 * WORDS_PER_SITE * i, _flag.device_ptr


def pending() -> bool:
    """Whether some kernel has counted a bad value since the last check (no sync: one host load)."""
    return _flag is not None and _flag.word[0] != 0


def raise_pending() -> None:
    """Raise DeviceCheckError if a kernel counted bad values (cheap when none did); call it at points
    where the host synchronizes anyway. The words are read after synchronizing their devices and reset,
    so each bad call is reported once."""
    if _flag is None or _flag.word[0] == 0:
        return
    reports = []
    with _lock:
        _flag.word[0] = 0
        for device, words in _devices.items():
            if torch.cuda.is_current_stream_capturing():
                _flag.word[0] = 1  # cannot synchronize inside a capture: report at the next check outside it
                return
            torch.cuda.synchronize(device)
            values = words.words.view(MAX_SITES, WORDS_PER_SITE)[: len(words.names)].cpu().tolist()
            words.words.zero_()
            torch.cuda.synchronize(device)
            for name, (count, lo, hi, _) in zip(words.names, values):
                if count:
                    bad = (hi << 32) | (lo & 0xFFFFFFFF)
                    bad = bad - (1 << 64) if bad >= 1 << 63 else bad
                    reports.append(f"{name}: {count} bad value(s) on cuda:{device}, e.g. {bad}")
    if reports:
        raise DeviceCheckError("a kernel found values out of range (checked on the device, reported at the first "
                               "check after it; EPKERN_CHECK_VALUES=2 raises at the bad call itself):\n  "
                               + "\n  ".join(reports))


def check_errors() -> None:
    """Synchronize every device with checked kernels and raise DeviceCheckError for any bad value they
    counted since the last check (see the module docstring)."""
    if _flag is None:
        return
    if not torch.cuda.is_current_stream_capturing():
        for device in list(_devices):
            torch.cuda.synchronize(device)
    raise_pending()
