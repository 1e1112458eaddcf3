"""The per-call launch path: stream handles, launch configs and kernel arguments, made cheap.

An eager call pays for everything here on every launch, so each piece is built once and reused:
  * the current stream is read as a raw handle (no torch Stream object per call);
  * each raw handle maps to one cuda.core Stream (passing a foreign stream through the
    __cuda_stream__ protocol makes cuda.core build a Stream and emit a DeprecationWarning per call);
  * LaunchConfig objects are cached per (grid, block, smem, cooperative);
  * tensors pass as Python ints, which cuda.core packs as pointers without any numpy work.
Nothing here syncs, allocates device memory or calls the driver, so it is the same under capture.
"""
from __future__ import annotations

import functools
import operator

import numpy as np
import torch

_STREAM_CACHE_LIMIT = 4096  # distinct raw handles kept; cleared past it (a user making streams in a loop)
_streams: dict = {}
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device: int) -> int:
    """Raw handle of torch's current stream on device (the capture stream while capturing)."""
    if _raw_stream is not None:
        return _raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream


def stream_handle(stream) -> int:
    """Raw handle of a stream given as an int, a torch stream or any __cuda_stream__ object."""
    if type(stream) is int:
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        handle = stream.__cuda_stream__()[1]
    return int(handle)


def cuda_stream(handle: int):
    """The cuda.core Stream borrowing raw handle (not owned: torch keeps the stream alive)."""
    stream = _streams.get(handle)
    if stream is None:
        from cuda.core import Stream

        if len(_streams) >= _STREAM_CACHE_LIMIT:
            _streams.clear()
        stream = _streams[handle] = Stream.from_handle(handle)
    return stream


@functools.lru_cache(maxsize=4096)
def launch_config(grid, block, smem: int, cooperative: bool):
    """A cached cuda.core LaunchConfig (read-only to the launcher, so one object serves every call)."""
    from cuda.core import LaunchConfig

    try:
        return LaunchConfig(grid=grid, block=block, shmem_size=smem, is_cooperative=cooperative)
    except TypeError:  # cuda.core < 1.2 spells it cooperative_launch
        return LaunchConfig(grid=grid, block=block, shmem_size=smem, cooperative_launch=cooperative)


_Tensor = torch.Tensor
_generic = np.generic


def kernel_arg(value):
    """Torch tensors pass their device pointer; numpy scalars pass as they are typed.

    Plain Python ints and floats are refused: the C type must be stated (np.int32(...))."""
    if isinstance(value, _Tensor):
        return value.data_ptr()  # a Python int: cuda.core packs it as a pointer
    if value is None:
        return 0
    if isinstance(value, _generic):
        return value
    raise TypeError(f"kernel argument {value!r}: pass a torch.Tensor, None (null pointer) or a numpy scalar "
                    "such as np.int32(x) / np.float32(x)")


def kernel_args(args: tuple) -> list:
    """kernel_arg of each argument; the common types are tested inline (this runs for every launch)."""
    out = []
    for a in args:
        t = type(a)
        if t is _Tensor:
            out.append(a.data_ptr())
        elif t is np.int32 or t is np.int64:
            out.append(a)
        else:
            out.append(kernel_arg(a))
    return out


# -- kernel parameter lists ---------------------------------------------------------------------
# numpy scalars are immutable, and a launch's scalars (ranks, offsets, sizes) mostly repeat from call
# to call: a cached scalar for a Python int costs a dict lookup instead of a numpy construction
def _cast(ctype):
    cached = functools.lru_cache(maxsize=4096)(ctype)

    def cast(value):
        return cached(value) if type(value) is int else ctype(value)
    return cast


_CASTS = {"i32": _cast(np.int32), "u32": _cast(np.uint32), "i64": _cast(np.int64), "u64": _cast(np.uint64),
          "f32": np.float32, "addr": _cast(np.uint64)}


class KernelParams:
    """One entry point's parameter list, stated once: launchers pack their arguments by name with it,
    and tests compare it with the template's `extern "C" __global__` signature.

    KernelParams("dispatch", "x topk_idx num_tokens:i32 ... status:addr"): a bare name is a pointer
    (a tensor, or None for a null pointer); `:i32 :u32 :i64 :u64 :f32` a scalar of that C type;
    `:addr` a pointer given as an integer address (host-mapped or peer memory)."""

    __slots__ = ("entry", "names", "types", "_get", "_casts")

    def __init__(self, entry: str, params: str):
        items = [p.partition(":") for p in params.split()]
        self.entry = entry
        self.names = tuple(name for name, _, _ in items)
        self.types = tuple(kind or "ptr" for _, _, kind in items)
        unknown = sorted(set(self.types) - set(_CASTS) - {"ptr"})
        if unknown or len(set(self.names)) != len(self.names):
            raise ValueError(f"KernelParams({entry!r}): unknown types {unknown} or repeated names in {params!r}")
        getter = operator.itemgetter(*self.names)
        self._get = getter if len(self.names) > 1 else (lambda values: (getter(values),))
        self._casts = tuple((i, _CASTS[kind]) for i, kind in enumerate(self.types) if kind != "ptr")

    def pack(self, **values) -> list:
        """The arguments in the kernel's order, scalars cast to their C types; every name exactly once."""
        if len(values) != len(self.names):
            raise self._mismatch(values)
        try:
            args = list(self._get(values))
        except KeyError:
            raise self._mismatch(values) from None
        for i, cast in self._casts:
            args[i] = cast(args[i])
        return args

    def _mismatch(self, values) -> TypeError:
        missing = [n for n in self.names if n not in values]
        unknown = sorted(set(values) - set(self.names))
        return TypeError(f"kernel {self.entry!r}: missing arguments {missing}, unknown arguments {unknown}; "
                         f"expected {list(self.names)}")
