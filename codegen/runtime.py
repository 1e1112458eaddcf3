"""Load cubins and launch their kernels on torch's current stream (cuda.core)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from . import compiler, jit
from .launch import LaunchError, Launcher, current_stream_handle, launch_values, stream_handle

_LAUNCHER_LIMIT = 1024  # prepared launches kept per module (grids that follow the data make new ones)


def _set_max_dynamic_smem(kernel, smem: int, device: int) -> None:
    from cuda.bindings import driver

    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    handle = kernel.handle
    if isinstance(handle, driver.CUkernel):
        (err,) = driver.cuKernelSetAttribute(attr, smem, handle, device)
    else:
        (err,) = driver.cuFuncSetAttribute(handle, attr, smem)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise LaunchError(f"could not allow {smem} bytes of dynamic shared memory: {err}")


class _Entry:
    """One entry point of a loaded module: its kernel handle, its name for errors, its smem limit."""

    __slots__ = ("kernel", "name", "smem_allowed")

    def __init__(self, kernel, name: str):
        self.kernel = kernel
        self.name = name
        self.smem_allowed = 48 * 1024


@dataclass
class LoadedModule:
    """One spec's cubin loaded on one device."""

    spec: object
    arch: str
    device: int
    object_code: object
    _entries: dict = field(default_factory=dict)
    _launchers: dict = field(default_factory=dict)
    _resident: dict = field(default_factory=dict)  # (entry, threads, smem) -> blocks resident at once

    def entry(self, entry: str = "") -> _Entry:
        """Entry point `<symbol>_<entry>` (or `<symbol>` for entry ''), looked up once."""
        e = self._entries.get(entry)
        if e is None:
            name = f"{self.spec.symbol}_{entry}" if entry else self.spec.symbol
            e = self._entries[entry] = _Entry(self.object_code.get_kernel(name), name)
        return e

    def kernel(self, entry: str = ""):
        return self.entry(entry).kernel

    def all_resident(self, entry: str, blocks: int, threads: int, smem: int = 0) -> bool:
        """Whether `blocks` blocks of entry can all be resident on the device at once (what a cooperative
        launch needs): the driver's occupancy for (threads, smem) times the SM count; cached."""
        key = (entry, threads, smem)
        most = self._resident.get(key)
        if most is None:
            import torch
            from cuda.bindings import driver

            from .launch import as_function

            e = self._entries.get(entry) or self.entry(entry)
            if smem > e.smem_allowed:
                _set_max_dynamic_smem(e.kernel, smem, self.device)
                e.smem_allowed = smem
            err, n = driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(as_function(e.kernel.handle), threads, smem)
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            most = self._resident[key] = (int(n) if err == driver.CUresult.CUDA_SUCCESS else 0) * sms
        return blocks <= most

    def launcher(self, entry: str, grid, block, codes: str, smem: int = 0, cooperative: bool = False) -> Launcher:
        """A prepared launch of entry point `<symbol>_<entry>` (see codegen.launch.Launcher): build it once
        per call signature and call it as launcher(stream_handle, *values) on every call."""
        e = self._entries.get(entry) or self.entry(entry)
        if smem > e.smem_allowed:
            _set_max_dynamic_smem(e.kernel, smem, self.device)
            e.smem_allowed = smem
        return Launcher(getattr(e.kernel, "handle", None), e.name, grid, block, codes, smem=smem,
                        cooperative=cooperative, device=self.device)

    def launch(self, entry: str, grid, block, *args, smem: int = 0, cooperative: bool = False, stream=None):
        """Launch entry point `<symbol>_<entry>` (or `<symbol>` for entry '') on a stream: torch's
        current stream on this module's device by default, else a torch stream, a raw handle or
        any __cuda_stream__ object. Arguments as codegen.launch.kernel_arg takes them; the launch goes
        through a prepared Launcher kept per (entry, grid, block, smem, cooperative, argument types)."""
        codes, values = launch_values(args)
        self.launch_values(entry, grid, block, codes, values, smem=smem, cooperative=cooperative, stream=stream)

    def launch_values(self, entry: str, grid, block, codes: str, values, smem: int = 0, cooperative: bool = False,
                      stream=None):
        """launch() with the arguments already as a Launcher takes them (codes and values, e.g.
        KernelParams.codes and KernelParams.values(...)): no per-argument type dispatch."""
        grid = grid if type(grid) is int else tuple(grid)
        block = block if type(block) is int else tuple(block)
        key = (entry, grid, block, smem, cooperative, codes)
        found = self._launchers.get(key)
        if found is None:
            if len(self._launchers) >= _LAUNCHER_LIMIT:
                self._launchers.clear()
            found = self._launchers[key] = self.launcher(entry, grid, block, codes, smem=smem, cooperative=cooperative)
        found(current_stream_handle(self.device) if stream is None else stream_handle(stream), *values)


_modules: dict = {}
_modules_lock = threading.Lock()
_current_set: set = set()


def ensure_context(device: int) -> None:
    """Make torch's primary context of device current on this thread (once per thread)."""
    key = (threading.get_ident(), device)
    if key in _current_set:
        return
    import torch
    from cuda.core import Device

    torch.cuda.init()
    with torch.cuda.device(device):
        torch.cuda.current_stream()  # makes torch's primary context current on this thread
        Device(device).set_current()
    _current_set.add(key)


def get_module(spec, device: int | None = None, arch: str | None = None) -> LoadedModule:
    """The loaded module for spec on device (current torch device by default); compiled or read once."""
    import torch

    if device is None:
        device = torch.cuda.current_device()
    cache_key = (spec, device, arch)
    module = _modules.get(cache_key)
    if module is not None:
        return module
    with _modules_lock:
        module = _modules.get(cache_key)
        if module is None:
            from cuda.core import ObjectCode

            target = arch or compiler.target_arch()
            entry = jit.build(spec, target)
            ensure_context(device)
            code = ObjectCode.from_cubin(entry.cubin, name=spec.name)
            module = _modules[cache_key] = LoadedModule(spec, target, device, code)
    return module
