"""Peer memory over NVLink: one device allocation per rank, mapped into every rank of a node.

`PeerBuffer(group, nbytes)` allocates `nbytes` on this rank's GPU (cuMemAlloc, outside torch's
caching allocator so the pointer is the allocation base), exports it with a CUDA IPC handle,
exchanges the handles over torch.distributed and opens every peer's. Kernels receive the table
of all ranks' base pointers (`ptr_table`, int64 [R] on the device) and address any rank's copy
directly; device-side signalling uses flags inside these buffers.

`HostMapped(nbytes)` is pinned host memory mapped into the device: kernels write counters or
error codes there and the host polls them with a timeout instead of blocking in a sync.

Both free their memory on close() and at interpreter exit (peers first, then our own, after a
barrier so no rank frees memory a peer still reads).
"""
from __future__ import annotations

import atexit
import ctypes
import socket
import weakref

import torch
import torch.distributed as dist

_live: "weakref.WeakSet[PeerBuffer | HostMapped]" = weakref.WeakSet()


class PeerAccessError(RuntimeError):
    pass


def _check(result, what: str):
    from cuda.bindings import driver

    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if isinstance(result, tuple):
        return result[1] if len(result) == 2 else result[1:]
    return None


def _make_current(device: torch.device) -> None:
    """Make torch's primary context current on this thread (the driver calls below use it)."""
    torch.cuda.set_device(device)
    torch.cuda.current_stream(device)
    torch.empty(1, device=device)  # forces lazy context creation


class _ArrayView:
    """A device pointer seen through __cuda_array_interface__, so torch can wrap it without a copy."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "typestr": typestr,
                                         "version": 3, "strides": None}


_TYPESTR = {torch.uint8: "|u1", torch.int8: "|i1", torch.int32: "<i4", torch.int64: "<i8", torch.float32: "<f4",
            torch.float16: "<f2", torch.bfloat16: "<f2", torch.float8_e4m3fn: "|u1", torch.uint64: "<u8"}


def wrap_pointer(ptr: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A torch tensor viewing device memory at ptr (no copy, no ownership)."""
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.as_tensor(_ArrayView(ptr, (numel * itemsize,), "|u1"), device=device)
    return raw.view(dtype).view(shape)


def _gather_devices(group, device_index: int) -> list:
    """Every rank's (host name, GPU index), gathered over group."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (socket.gethostname(), device_index), group=group)
    return everyone


def _peer_problem(everyone: list, rank: int, device_index: int) -> str | None:
    """Why this rank cannot map every other rank's peer memory (None: it can)."""
    hosts = {h for h, _ in everyone}
    if len(hosts) != 1:
        return f"NVLink peer memory needs all ranks on one node; ranks are on {sorted(hosts)}"
    for r, (_, dev) in enumerate(everyone):
        if r != rank and dev != device_index and not torch.cuda.can_device_access_peer(device_index, dev):
            return f"GPU {device_index} (rank {rank}) cannot access GPU {dev} (rank {r}) as a peer"
    return None


def peer_access_everywhere(group, device_index: int) -> bool:
    """Collective over group: True on every rank iff every rank can map every other rank's memory
    (the check PeerBuffer makes before it maps anything), whatever backend the group runs on."""
    problem = _peer_problem(_gather_devices(group, device_index), dist.get_rank(group), device_index)
    verdicts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(verdicts, problem, group=group)
    return all(v is None for v in verdicts)


class PeerBuffer:
    """`nbytes` of device memory on every rank of `group`, each mapped into every rank."""

    def __init__(self, group, nbytes: int, device: torch.device | int | None = None):
        from cuda.bindings import driver

        if nbytes <= 0:
            raise ValueError(f"nbytes={nbytes}: must be positive")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else
                                   (device if isinstance(device, int) else device.index))
        self.nbytes = int(nbytes)
        self._closed = False
        _make_current(self.device)
        self._check_same_node()

        self.local_ptr = int(_check(driver.cuMemAlloc(self.nbytes), f"cuMemAlloc({self.nbytes})"))
        _check(driver.cuMemsetD8(self.local_ptr, 0, self.nbytes), "cuMemsetD8")
        handle = _check(driver.cuIpcGetMemHandle(self.local_ptr), "cuIpcGetMemHandle")
        handles: list = [None] * self.num_ranks
        dist.all_gather_object(handles, ctypes.string_at(handle.getPtr(), 64), group=group)

        self.ptrs = []
        self._opened = []
        flags = driver.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
        for r, raw in enumerate(handles):
            if r == self.rank:
                self.ptrs.append(self.local_ptr)
                continue
            peer = driver.CUipcMemHandle()
            ctypes.memmove(peer.getPtr(), raw, 64)
            ptr = int(_check(driver.cuIpcOpenMemHandle(peer, flags), f"cuIpcOpenMemHandle(rank {r})"))
            self.ptrs.append(ptr)
            self._opened.append(ptr)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=group)
        self.ptr_table = torch.tensor(self.ptrs, dtype=torch.int64, device=self.device)
        _live.add(self)

    def _check_same_node(self) -> None:
        problem = _peer_problem(_gather_devices(self.group, self.device.index), self.rank, self.device.index)
        if problem is not None:
            raise PeerAccessError(problem)

    def view(self, rank: int, offset: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A tensor over [offset, offset + size) of rank's copy (rank == self.rank: our own)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        size = itemsize
        for s in shape:
            size *= s
        if offset < 0 or offset + size > self.nbytes:
            raise ValueError(f"view [{offset}, {offset + size}) exceeds the {self.nbytes}-byte peer buffer")
        return wrap_pointer(self.ptrs[rank] + offset, tuple(shape), dtype, self.device)

    def close(self) -> None:
        """Unmap peers, wait for every rank to do the same, free our allocation."""
        if self._closed:
            return
        from cuda.bindings import driver

        self._closed = True
        torch.cuda.synchronize(self.device)
        for ptr in self._opened:
            driver.cuIpcCloseMemHandle(ptr)
        self._opened = []
        if dist.is_initialized():
            try:
                dist.barrier(group=self.group)
            except Exception:
                pass  # a dead peer must not stop us from freeing our memory
        driver.cuMemFree(self.local_ptr)
        _live.discard(self)


class HostMapped:
    """Pinned host memory that kernels write through a device pointer and the host reads directly."""

    def __init__(self, nbytes: int, device: torch.device | None = None):
        from cuda.bindings import driver

        _make_current(device or torch.device("cuda", torch.cuda.current_device()))
        self.nbytes = int(nbytes)
        flags = driver.CU_MEMHOSTALLOC_DEVICEMAP | driver.CU_MEMHOSTALLOC_PORTABLE
        self.host_ptr = int(_check(driver.cuMemHostAlloc(self.nbytes, flags), "cuMemHostAlloc"))
        ctypes.memset(self.host_ptr, 0, self.nbytes)
        self.device_ptr = int(_check(driver.cuMemHostGetDevicePointer(self.host_ptr, 0), "cuMemHostGetDevicePointer"))
        self._closed = False
        _live.add(self)

    def host_array(self, ctype, count: int):
        """A ctypes array over the host side, for polling (volatile reads through ctypes)."""
        return (ctype * count).from_address(self.host_ptr)

    def close(self) -> None:
        if self._closed:
            return
        from cuda.bindings import driver

        self._closed = True
        driver.cuMemFreeHost(self.host_ptr)
        _live.discard(self)


@atexit.register
def _close_all() -> None:
    for obj in list(_live):
        try:
            obj.close()
        except Exception:
            pass
