"""Correctness at an EP size larger than the GPU count: R processes share this machine's GPUs.

    python3 scripts/oversubscribed_ep.py --ranks 8 [--what intranode,low_latency]

Rank r runs on GPU r % (number of GPUs) in a gloo group (NCCL refuses two ranks on one GPU); the
NVLink peer buffers of ranks on the same GPU are mapped through CUDA IPC like any other. The
kernels of processes sharing a GPU do not run at once: the GPU time-slices between them, and a
kernel spinning on a flag is preempted so the kernel it waits for can run. The checks are the GPU
tests' (the normal-mode option matrix of tests/test_buffer_matrix.py on the NVLink backend, and
tests/test_low_latency_gpu.py's round trips, masking and graph replay); times mean nothing here.
Exit status 0 when every rank passed.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")


def _gather_through_cpu(t, group, num_ranks):
    parts = [torch.empty_like(t, device="cpu") for _ in range(num_ranks)]
    dist.all_gather(parts, t.contiguous().cpu(), group=group)
    return [p.to(t.device) for p in parts]


def _intranode(rank: int, num_ranks: int, num_gpus: int, init_file: str) -> None:
    sys.path.insert(0, TESTS)
    import test_buffer_matrix as M

    import epkern.buffer as B

    torch.cuda.set_device(rank % num_gpus)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    M._gather = _gather_through_cpu   # gloo gathers CPU tensors only
    try:
        group = dist.group.WORLD
        buffer = B.Buffer(group, num_nvl_bytes=int(5e8), backend="nvlink")
        assert buffer.backend == "nvlink"
        M.check_validation(buffer, num_ranks, "cuda")
        M.run_matrix(buffer, group, rank, num_ranks, "cuda", 11, num_tokens=300, hidden=2048,
                     num_experts=4 * num_ranks, num_topk=4)
        M.run_matrix(buffer, group, rank, num_ranks, "cuda", 12, num_tokens=256, hidden=7168, num_experts=256,
                     num_topk=8, quick=True)
        buffer.destroy()
        print(f"intranode rank {rank}/{num_ranks} (GPU {rank % num_gpus}): passed", flush=True)
    finally:
        dist.destroy_process_group()


def _low_latency(rank: int, num_ranks: int, num_gpus: int, port: int) -> None:
    sys.path.insert(0, TESTS)
    import test_low_latency_gpu as LL

    LL._worker(rank, num_ranks, port, backend="gloo", num_gpus=num_gpus)
    print(f"low_latency rank {rank}/{num_ranks} (GPU {rank % num_gpus}): passed", flush=True)


def _run(rank: int, what: str, num_ranks: int, num_gpus: int, arg) -> None:
    try:
        (_intranode if what == "intranode" else _low_latency)(rank, num_ranks, num_gpus, arg)
    except BaseException:
        traceback.print_exc()
        raise


def _precompile(num_ranks: int) -> None:
    """Build the kernels the checks use in parallel first (the ranks would otherwise take turns)."""
    import json
    import subprocess

    deployments = [dict(hidden=2048, num_experts=4 * num_ranks, num_topk=4, ep_sizes=[num_ranks]),
                   dict(hidden=7168, num_experts=256, num_topk=8, ep_sizes=[num_ranks]),
                   dict(hidden=2944, num_experts=32, num_topk=8, ep_sizes=[num_ranks])]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(deployments, f)
    subprocess.run([sys.executable, "-m", "epkern.cli", "precompile", "--config", f.name], check=True,
                   stdout=subprocess.DEVNULL)
    os.unlink(f.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--what", default="intranode,low_latency")
    args = parser.parse_args()
    num_gpus = torch.cuda.device_count()
    if num_gpus == 0:
        print("no GPU: nothing to run")
        return 1
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    _precompile(args.ranks)
    failed = []
    for what in args.what.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            if what == "intranode":
                arg = os.path.join(tmp, "init")
            else:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    arg = s.getsockname()[1]
            try:
                mp.spawn(_run, args=(what, args.ranks, num_gpus, arg), nprocs=args.ranks, join=True)
                print(f"== {what}: EP{args.ranks} on {num_gpus} GPU(s): PASSED", flush=True)
            except Exception as exc:
                print(f"== {what}: EP{args.ranks} on {num_gpus} GPU(s): FAILED ({type(exc).__name__}: {exc})", flush=True)
                failed.append(what)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
