"""The driver calls of the per-call path, made through ctypes on the entry points cuda.bindings resolves.

cuda.bindings' wrappers type-check and convert every argument and build a CUresult enum on each
call: about 2 us of an 8.6 us launch on an H200 host (benchmarks/results/host_overhead.json, pieces).
The per-call path (codegen.launch.Launcher, epkern.streams.StreamOrder) instead calls the same driver
functions, looked up once with cuGetProcAddress (cuda.bindings), through ctypes with the GIL held, as
torch's own launches hold it: pointers pass as c_void_p made once (stream_arg caches one per stream
handle), small integers as they are, and the result comes back as a plain int (0 = CUDA_SUCCESS).
Everything else (loading, occupancy, parameter info, error names) stays on cuda.bindings.
"""
from __future__ import annotations

import ctypes
import functools

ERROR_INVALID_CONTEXT = 201   # CUresult: the calling thread has no current context
_ENTRY_VERSION = 12000        # the driver API version whose signatures these calls use (unchanged since)
_STREAM_CACHE_LIMIT = 4096    # distinct raw handles kept; cleared past it (a user making streams in a loop)
_streams: dict = {}


@functools.cache
def entry(name: str):
    """The driver function `name` (e.g. "cuLaunchKernel") as a ctypes function returning the CUresult.
    Its arguments are not declared: pass pointers as c_void_p (None for NULL) and ints below 2**31."""
    from cuda.bindings import driver

    err, address, status = driver.cuGetProcAddress(name.encode(), _ENTRY_VERSION,
                                                   driver.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT)
    if err != driver.CUresult.CUDA_SUCCESS or not int(address):
        raise RuntimeError(f"cuGetProcAddress({name!r}) failed: {err}, {status}")
    return ctypes.PYFUNCTYPE(ctypes.c_int)(int(address))


def pointer(value: int) -> ctypes.c_void_p:
    """A handle or address as the pointer argument of these calls (0 is NULL)."""
    return ctypes.c_void_p(int(value) or None)


def stream_arg(handle: int) -> ctypes.c_void_p:
    """The raw stream handle as a pointer argument, one object per handle (0 is the legacy default stream)."""
    arg = _streams.get(handle)
    if arg is None:
        if len(_streams) >= _STREAM_CACHE_LIMIT:
            _streams.clear()
        arg = _streams[handle] = pointer(handle)
    return arg


def error_name(err: int) -> str:
    """The CUresult's name (cuda.bindings' enum), for messages."""
    try:
        from cuda.bindings import driver

        return str(driver.CUresult(err))
    except Exception:  # an unknown code or no bindings: the number
        return f"CUresult {err}"
