"""Load cubins and launch their kernels on torch's current stream (cuda.core)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from . import compiler, jit


class LaunchError(RuntimeError):
    pass


class _StreamRef:
    """Any CUDA stream handle seen through the __cuda_stream__ protocol."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def _torch_stream_handle(stream) -> int:
    import torch

    if stream is None:
        stream = torch.cuda.current_stream()
    return int(stream.cuda_stream)


def kernel_arg(value):
    """Torch tensors pass their device pointer; numpy scalars pass as they are typed.

    Plain Python ints and floats are refused: the C type must be stated (np.int32(...))."""
    import torch

    if isinstance(value, torch.Tensor):
        return np.uint64(value.data_ptr())
    if value is None:
        return np.uint64(0)
    if isinstance(value, np.generic):
        return value
    raise TypeError(f"kernel argument {value!r}: pass a torch.Tensor, None (null pointer) or a numpy scalar "
                    "such as np.int32(x) / np.float32(x)")


def _launch_config(grid, block, smem: int, cooperative: bool):
    from cuda.core import LaunchConfig

    try:
        return LaunchConfig(grid=grid, block=block, shmem_size=smem, is_cooperative=cooperative)
    except TypeError:  # cuda.core < 1.2 spells it cooperative_launch
        return LaunchConfig(grid=grid, block=block, shmem_size=smem, cooperative_launch=cooperative)


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


@dataclass
class LoadedModule:
    """One spec's cubin loaded on one device."""

    spec: object
    arch: str
    device: int
    object_code: object
    _kernels: dict = field(default_factory=dict)
    _smem_allowed: dict = field(default_factory=dict)

    def kernel(self, entry: str = ""):
        name = f"{self.spec.symbol}_{entry}" if entry else self.spec.symbol
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = self.object_code.get_kernel(name)
        return k

    def launch(self, entry: str, grid, block, *args, smem: int = 0, cooperative: bool = False, stream=None):
        """Launch entry point `<symbol>_<entry>` (or `<symbol>` for entry '') on a torch stream."""
        from cuda.core import launch

        k = self.kernel(entry)
        name = f"{self.spec.symbol}_{entry}" if entry else self.spec.symbol
        if smem > 48 * 1024 and self._smem_allowed.get(name, 0) < smem:
            _set_max_dynamic_smem(k, smem, self.device)
            self._smem_allowed[name] = smem
        config = _launch_config(grid, block, smem, cooperative)
        try:
            launch(_StreamRef(_torch_stream_handle(stream)), config, k, *(kernel_arg(a) for a in args))
        except Exception as exc:
            raise LaunchError(f"launching {name} (grid={grid}, block={block}, smem={smem}) failed: {exc}") from exc


_modules: dict = {}
_modules_lock = threading.Lock()
_current_set: set = set()


def _ensure_context(device: int) -> None:
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
            _ensure_context(device)
            code = ObjectCode.from_cubin(entry.cubin, name=spec.name)
            module = _modules[cache_key] = LoadedModule(spec, target, device, code)
    return module
