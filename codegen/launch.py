"""The per-call launch path: stream handles, kernel arguments and prepared launches, made cheap.

An eager call pays for everything here on every launch, so each piece is built once and reused:
  * the current stream is read as a raw handle (no torch Stream object per call);
  * each raw handle maps to one cached pointer argument (codegen.driver_calls);
  * a Launcher holds one kernel's grid, block, shared memory and packed argument buffer, so a call
    writes the values and calls the driver's cuLaunchKernel (through ctypes); tensors pass as their pointers.
Nothing here syncs or allocates device memory, so it is the same under capture.
"""
from __future__ import annotations

import functools
import operator

import numpy as np
import torch

from . import driver_calls

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


# numpy scalar type -> Launcher argument code (a uint64 goes in a pointer slot: both are 8 unsigned bytes)
_ARG_CODES = {np.int32: "i", np.int64: "q", np.uint32: "I", np.uint64: "p", np.float32: "f"}


def launch_values(args: tuple) -> tuple[str, list]:
    """(the Launcher codes, the values) of launch arguments as kernel_arg takes them: tensors pass their
    pointer, None a null pointer, numpy scalars their value in a slot of their type."""
    codes, values = [], []
    for a in args:
        t = type(a)
        if t is _Tensor or isinstance(a, _Tensor):
            codes.append("p")
            values.append(a.data_ptr())
        elif a is None:
            codes.append("p")
            values.append(0)
        else:
            code = _ARG_CODES.get(t)
            if code is None:
                kernel_arg(a)  # raises the TypeError that names the argument
                raise TypeError(f"kernel argument {a!r} of type {t.__name__}: no C type for it")
            codes.append(code)
            values.append(a)
    return "".join(codes), values


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
# parameter type -> Launcher argument code (pointers and unsigned 64-bit values share the 8-byte 'p' slot)
_TYPE_CODES = {"ptr": "p", "addr": "p", "u64": "p", "i64": "q", "i32": "i", "u32": "I", "f32": "f"}


def _pointer(value) -> int:
    """A pointer argument's address: a tensor's data pointer, 0 for None, an int as it is."""
    return 0 if value is None else (value.data_ptr() if isinstance(value, _Tensor) else int(value))


class BoundParams:
    """An argument list of a KernelParams with its static values in place (KernelParams.bind):
    bound(*dynamic) returns the list (a tuple) with the per-call values written into their slots.

    The call is one generated function whose body is the tuple display itself (static values as
    constants of its namespace), so a call builds the tuple in one step: a copy of the template and a
    loop over the slots took 1.2 us for a 26-argument launch on a CPU host, this takes 0.35 us."""

    __slots__ = ("_slots", "_build")

    def __init__(self, template: list, slots: tuple):
        self._slots = tuple(slots)
        dynamic = {slot: i for i, slot in enumerate(self._slots)}
        items = [f"d{dynamic[i]}" if i in dynamic else f"c{i}" for i in range(len(template))]
        source = (f"def build({', '.join(f'd{i}' for i in range(len(self._slots)))}):\n"
                  f"    return ({''.join(item + ', ' for item in items)})\n")
        namespace = {f"c{i}": v for i, v in enumerate(template) if i not in dynamic}
        exec(source, namespace)  # names and integer constants only: nothing of a caller's text
        self._build = namespace["build"]

    def __call__(self, *dynamic) -> tuple:
        try:
            return self._build(*dynamic)
        except TypeError:
            raise TypeError(f"bound arguments: {len(self._slots)} per-call values expected, got {len(dynamic)}") \
                from None


class KernelParams:
    """One entry point's parameter list, stated once: launchers pack their arguments by name with it,
    and tests compare it with the template's `extern "C" __global__` signature.

    KernelParams("dispatch", "x topk_idx num_tokens:i32 ... status:addr"): a bare name is a pointer
    (a tensor, or None for a null pointer); `:i32 :u32 :i64 :u64 :f32` a scalar of that C type;
    `:addr` a pointer given as an integer address (host-mapped or peer memory)."""

    __slots__ = ("entry", "names", "types", "codes", "_get", "_casts", "_pointers")

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
        self.codes = "".join(_TYPE_CODES[kind] for kind in self.types)  # a Launcher's argument codes
        self._pointers = tuple(i for i, kind in enumerate(self.types) if kind in ("ptr", "addr"))

    def values(self, **values) -> list:
        """The arguments in the kernel's order as a Launcher with `codes` takes them: tensors as their
        pointers, None as 0, scalars as given (the Launcher's packing refuses one that does not fit)."""
        args = self._ordered(values)
        for i in self._pointers:
            args[i] = _pointer(args[i])
        return args

    def bind(self, dynamic: str, **static) -> "BoundParams":
        """The argument list with `static` values fixed now and the names in `dynamic` (space-separated,
        in that order) given per call: bind(...)(*values) -> the values a Launcher with `codes` takes.
        A static tensor passes its pointer as of now (it must outlive the binding and never move)."""
        names = dynamic.split()
        if sorted(names + list(static)) != sorted(self.names):
            raise self._mismatch(dict.fromkeys(names + list(static)))
        template = []
        for name, kind in zip(self.names, self.types):
            value = static.get(name)
            if name in names:
                value = 0
            elif kind == "ptr":
                value = _pointer(value)
            else:
                value = _CASTS[kind](value).item()
            template.append(value)
        return BoundParams(template, tuple(self.names.index(n) for n in names))

    def pack(self, **values) -> list:
        """The arguments in the kernel's order, scalars cast to their C types; every name exactly once."""
        args = self._ordered(values)
        for i, cast in self._casts:
            args[i] = cast(args[i])
        return args

    def _ordered(self, values: dict) -> list:
        """values (every name exactly once) as a list in the kernel's order."""
        if len(values) != len(self.names):
            raise self._mismatch(values)
        try:
            return list(self._get(values))
        except KeyError:
            raise self._mismatch(values) from None

    def _mismatch(self, values) -> TypeError:
        missing = [n for n in self.names if n not in values]
        unknown = sorted(set(values) - set(self.names))
        return TypeError(f"kernel {self.entry!r}: missing arguments {missing}, unknown arguments {unknown}; "
                         f"expected {list(self.names)}")


# ---- the fast launch: one prepared cuLaunchKernel per call signature ---------------------------------
# cuda.core's launch re-reads the config and converts every argument on each call (~4 us on an H200
# host). A Launcher does that work once: it holds the kernel's CUfunction, the grid, block and shared
# memory, and an argument buffer whose void* array the driver reads; a call writes the values that
# change (pointers, sizes) into the buffer with one struct.pack_into and calls cuLaunchKernel
# (codegen.driver_calls: the driver's entry point through ctypes, the stream as a cached pointer).
# Argument codes, one per kernel parameter, each in an 8-byte slot:
#   'p' a pointer (an int: tensor.data_ptr(), 0 for NULL), 'q' int64, 'i' int32, 'I' uint32, 'f' float32.
_SLOT_FORMATS = {"p": "Q", "q": "q", "i": "i4x", "I": "I4x", "f": "f4x"}
_STREAMS_PER_LAUNCHER = 64  # argument tuples a Launcher keeps, one per raw stream handle
_driver_launch = None  # test hook: set_launch_hook replaces the driver call with a Python callable


def set_launch_hook(hook):
    """Test-only: route every Launcher call to hook(launcher, stream_handle, values) instead of the driver
    (None restores the driver). Returns the previous hook. The Python work of a call is unchanged."""
    global _driver_launch
    previous, _driver_launch = _driver_launch, hook
    return previous


class Launcher:
    """One kernel entry launched with a fixed grid, block and shared memory; `launcher(stream, *values)`
    enqueues it on the raw stream handle with the given argument values (see the codes above).

    Thread-safe (the buffer is written and handed to the driver under a lock; the driver copies the
    arguments before cuLaunchKernel returns). Nothing here allocates, syncs or reads the GPU, so a
    Launcher works the same during CUDA-graph capture."""

    __slots__ = ("name", "codes", "grid", "block", "smem", "cooperative", "device", "_fn", "_buf", "_params",
                 "_params_arg", "_pack", "_lock", "_head", "_driver", "_calls")

    def __init__(self, kernel_handle, name: str, grid, block, codes: str, smem: int = 0,
                 cooperative: bool = False, device: int = 0):
        import ctypes
        import struct
        import threading

        bad = set(codes) - set(_SLOT_FORMATS)
        if bad:
            raise ValueError(f"{name}: argument codes {sorted(bad)} are not among {sorted(_SLOT_FORMATS)}")
        grid = (grid, 1, 1) if isinstance(grid, int) else tuple(grid) + (1,) * (3 - len(grid))
        block = (block, 1, 1) if isinstance(block, int) else tuple(block) + (1,) * (3 - len(block))
        self.name, self.codes, self.grid, self.block = name, codes, grid, block
        self.smem, self.cooperative, self.device = smem, cooperative, device
        self._pack = struct.Struct("<" + "".join(_SLOT_FORMATS[c] for c in codes)).pack_into
        n = max(1, len(codes))
        self._buf = ctypes.create_string_buffer(8 * n)
        base = ctypes.addressof(self._buf)
        self._params = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        self._params_arg = driver_calls.pointer(ctypes.addressof(self._params) if codes else 0)
        self._lock = threading.Lock()
        self._calls: dict = {}  # raw stream handle -> the driver call's whole argument tuple
        self._fn = self._driver = None
        self._head = (None,) + grid + block + (smem,)   # the driver call's arguments before the stream
        if kernel_handle is not None:
            from cuda.bindings import driver

            self._fn = as_function(kernel_handle)
            _check_param_sizes(driver, self._fn, name, codes)
            self._head = (driver_calls.pointer(int(self._fn)),) + self._head[1:]
            self._driver = driver_calls.entry("cuLaunchCooperativeKernel" if cooperative else "cuLaunchKernel")

    def __call__(self, stream: int, *values) -> None:
        with self._lock:
            try:
                self._pack(self._buf, 0, *values)
            except Exception as exc:  # struct.error: a value does not fit its C type, or a wrong count
                raise LaunchError(f"{self.name}: arguments {values!r} do not fit the codes {self.codes!r}: "
                                  f"{exc}") from None
            if _driver_launch is not None:
                return _driver_launch(self, stream, values)
            args = self._calls.get(stream)
            if args is None:
                args = self._call_args(stream)
            err = self._driver(*args)
        if err:
            self._failed(err, stream, values)

    def _call_args(self, stream: int) -> tuple:
        """The driver call's arguments on this stream, made once per stream: cuLaunchKernel (extra = NULL)
        or cuLaunchCooperativeKernel with the packed buffer."""
        if len(self._calls) >= _STREAMS_PER_LAUNCHER:  # a caller making streams in a loop
            self._calls.clear()
        args = self._head + (driver_calls.stream_arg(stream), self._params_arg)
        if not self.cooperative:
            args += (None,)
        self._calls[stream] = args
        return args

    def _enqueue(self, stream: int) -> int:
        """The launch of the packed buffer on this stream; the CUresult."""
        args = self._calls.get(stream)
        return self._driver(*(args if args is not None else self._call_args(stream)))

    def _failed(self, err: int, stream: int, values: tuple) -> None:
        if err == driver_calls.ERROR_INVALID_CONTEXT:  # a thread that never used this device: once
            from .runtime import ensure_context

            ensure_context(self.device)
            with self._lock:
                self._pack(self._buf, 0, *values)
                err = self._enqueue(stream)
            if not err:
                return
        raise LaunchError(f"launching {self.name} (grid={self.grid}, block={self.block}, smem={self.smem}, "
                          f"cooperative={self.cooperative}) failed: {driver_calls.error_name(err)}")

    def values(self) -> tuple:
        """The argument values of the last call (for tests)."""
        import struct

        return struct.unpack_from("<" + "".join(_SLOT_FORMATS[c] for c in self.codes), self._buf, 0)


class LaunchError(RuntimeError):
    pass


_CODE_SIZES = {"p": 8, "q": 8, "i": 4, "I": 4, "f": 4}


def as_function(handle):
    """The CUfunction of a kernel handle in the current context: a CUkernel (cuda.core's library
    kernels) through cuKernelGetFunction, so every driver call (launch, cooperative launch, occupancy,
    parameter info) gets the type it documents."""
    from cuda.bindings import driver

    if isinstance(handle, driver.CUkernel):
        err, fn = driver.cuKernelGetFunction(handle)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise LaunchError(f"cuKernelGetFunction failed: {err}")
        return fn
    return handle if isinstance(handle, driver.CUfunction) else driver.CUfunction(int(handle))


def _check_param_sizes(driver, handle, name: str, codes: str) -> None:
    """Compare the codes with the kernel's own parameter list (cuFuncGetParamInfo, CUDA 12.4+; skipped
    where the driver has none): a wrong count or size would otherwise launch with garbage arguments."""
    get = driver.cuFuncGetParamInfo
    sizes = []
    for i in range(len(codes) + 1):
        try:
            err, _offset, size = get(handle, i)
        except Exception:  # an older driver or bindings: nothing to compare with
            return
        if err != driver.CUresult.CUDA_SUCCESS:
            break
        sizes.append(int(size))
    if not sizes and codes:
        return  # the query failed outright: nothing to compare with
    want = [_CODE_SIZES[c] for c in codes]
    if sizes != want:
        raise LaunchError(f"{name}: the kernel takes parameters of {sizes} bytes, the launcher's codes {codes!r} "
                          f"give {want}")


