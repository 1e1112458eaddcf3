"""Run one function on N ranks, each in its own process, with a process group set up: for tests,
scripts and benchmarks alike.

    from epkern.testing import multiproc
    results = multiproc.run(check, 2, "nccl", seed)        # check(rank, num_ranks, seed) on 2 GPUs

Group kinds:
  "nccl"  one rank per GPU (rank r on GPU r);
  "gloo"  ranks sharing the GPUs (rank r on GPU r % num_gpus; NCCL refuses two ranks on one GPU);
  "cpu"   gloo without any GPU;
  None    no process group (plain processes).
Processes are spawned (a fresh interpreter each, as CUDA needs), the group rendezvous on a free TCP
port of this host, NVLink multicast is kept off (NCCL_NVLS_ENABLE=0 and friends, unless set), and
every rank's return value comes back in rank order; `env` sets variables in every rank before
its group is set up (EPKERN_RANKS_PER_NODE, NCCL_P2P_DISABLE, ...), leaving this process's alone.
A rank that raises, or dies without a result, makes `run` raise RankError with every failing
rank's traceback, once the other ranks have finished or been stopped; ranks still running at the
timeout are stopped and named in a TimeoutError.

`all_gather(t, group)` gathers a tensor from every rank of a group of either kind: CUDA tensors go
through the CPU when the group is not NCCL (gloo gathers CPU tensors only).
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist

KINDS = ("nccl", "gloo", "cpu", None)
_NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class RankError(RuntimeError):
    """One or more ranks raised (or died); `failures` maps each rank to its traceback text."""

    def __init__(self, failures: dict[int, str]):
        self.failures = dict(sorted(failures.items()))
        text = "\n".join(f"--- rank {r} ---\n{tb.rstrip()}" for r, tb in self.failures.items())
        super().__init__(f"rank(s) {sorted(self.failures)} failed:\n{text}")


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_of(rank: int, kind: str | None, num_gpus: int | None = None) -> torch.device | None:
    """The GPU rank uses under a group kind (None for "cpu" and None)."""
    if kind == "nccl":
        return torch.device("cuda", rank)
    if kind == "gloo":
        return torch.device("cuda", rank % (num_gpus or torch.cuda.device_count()))
    return None


def init_group(rank: int, num_ranks: int, kind: str | None, port: int, num_gpus: int | None = None) -> None:
    """Set this process's GPU and join the group (what `run` does in each rank before calling fn)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {list(KINDS)}")
    for name, value in _NO_MULTICAST.items():
        os.environ.setdefault(name, value)
    device = device_of(rank, kind, num_gpus)
    if device is not None:
        torch.cuda.set_device(device)
    if kind is None:
        return
    if kind == "cpu":
        torch.set_num_threads(1)   # N ranks share the host's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    extra = {"device_id": device} if kind == "nccl" else {}
    dist.init_process_group("nccl" if kind == "nccl" else "gloo", rank=rank, world_size=num_ranks, **extra)


def _child(rank, num_ranks, kind, port, num_gpus, env, fn, args, results):
    try:
        os.environ.update(env)
        init_group(rank, num_ranks, kind, port, num_gpus)
        try:
            out = fn(rank, num_ranks, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        # pickled here, by value: a tensor shared through a file descriptor would vanish with this process
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run(fn, num_ranks: int, kind: str | None, *args, num_gpus: int | None = None, timeout_s: float = 900.0,
        grace_s: float = 10.0, env: dict[str, str] | None = None) -> list:
    """fn(rank, num_ranks, *args) in num_ranks spawned processes, each in a group of `kind`; returns
    the results in rank order (they must pickle: CPU tensors, numbers, lists). fn must be importable
    by name (a module-level function). num_gpus: how many GPUs "gloo" ranks share (default all).
    After a rank fails, the others get grace_s seconds to report before they are stopped (they may
    be waiting on the failed rank). env: variables set in every rank before its group is set up."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {list(KINDS)}")
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks!r}: expected an int >= 1")
    env = dict(env or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError(f"env={env!r}: expected a dict of str names to str values")
    if kind in ("nccl", "gloo"):
        available = torch.cuda.device_count()
        need = num_ranks if kind == "nccl" else 1
        if available < need:
            raise RuntimeError(f"kind={kind!r} with {num_ranks} ranks needs {need} GPU(s), found {available}")
        num_gpus = min(num_gpus or available, available)
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, num_ranks, kind, port, num_gpus, env, fn, args, results))
             for r in range(num_ranks)]
    for p in procs:
        p.start()
    done, failures = {}, {}

    def record(item):
        rank, ok, value = item
        if ok:
            done[rank] = pickle.loads(value)
        else:
            failures[rank] = value

    deadline = time.monotonic() + timeout_s
    try:
        while len(done) + len(failures) < num_ranks:
            now = time.monotonic()
            if now > deadline:
                break
            try:
                record(results.get(timeout=min(1.0, deadline - now)))
            except queue.Empty:
                for r, p in enumerate(procs):   # died without a word (killed, segfault, os._exit)
                    if r not in done and r not in failures and p.exitcode is not None:
                        try:   # a result may still be in the pipe
                            record(results.get(timeout=1.0))
                        except queue.Empty:
                            failures[r] = f"exited with code {p.exitcode} without a result"
            if failures:   # the others may be waiting on a failed rank: give them grace_s only
                deadline = min(deadline, time.monotonic() + grace_s)
    finally:
        finished = len(done) + len(failures) == num_ranks
        for p in procs:   # ranks that reported exit at once; the others are stopped
            p.join(timeout=30.0 if finished else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    missing = [r for r in range(num_ranks) if r not in done and r not in failures]
    if failures:
        for r in missing:
            failures[r] = "stopped after another rank failed (still running)"
        raise RankError(failures)
    if missing:
        raise TimeoutError(f"rank(s) {missing} did not finish within {timeout_s:g} s (stopped)")
    return [done[r] for r in range(num_ranks)]


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """t from every rank of group, in rank order, on t's device; through the CPU when t is a CUDA
    tensor and the group is not NCCL."""
    n = dist.get_world_size(group)
    if t.is_cuda and dist.get_backend(group) != "nccl":
        parts = [torch.empty(t.shape, dtype=t.dtype) for _ in range(n)]
        dist.all_gather(parts, t.contiguous().cpu(), group=group)
        return [p.to(t.device) for p in parts]
    parts = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts
