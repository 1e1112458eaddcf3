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
import sys
import tempfile

import torch
import torch.distributed as dist

from epkern.testing import multiproc

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)   # the GPU tests' checks (spawned ranks inherit sys.path)


def _intranode(rank: int, num_ranks: int) -> None:
    import test_buffer_matrix as M

    import epkern.buffer as B

    group = dist.group.WORLD
    buffer = B.Buffer(group, num_nvl_bytes=int(5e8), backend="nvlink")
    assert buffer.backend == "nvlink"
    M.check_validation(buffer, num_ranks, "cuda")
    M.run_matrix(buffer, group, rank, num_ranks, "cuda", 11, num_tokens=300, hidden=2048,
                 num_experts=4 * num_ranks, num_topk=4)
    M.run_matrix(buffer, group, rank, num_ranks, "cuda", 12, num_tokens=256, hidden=7168, num_experts=256,
                 num_topk=8, quick=True)
    buffer.destroy()
    print(f"intranode rank {rank}/{num_ranks} (GPU {torch.cuda.current_device()}): passed", flush=True)


def _low_latency(rank: int, num_ranks: int) -> None:
    import test_low_latency_gpu as LL

    LL._worker(rank, num_ranks)
    print(f"low_latency rank {rank}/{num_ranks} (GPU {torch.cuda.current_device()}): passed", flush=True)


CHECKS = {"intranode": _intranode, "low_latency": _low_latency}


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
    unknown = set(args.what.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"--what: unknown checks {sorted(unknown)}; known: {sorted(CHECKS)}")
    num_gpus = torch.cuda.device_count()
    if num_gpus == 0:
        print("no GPU: nothing to run")
        return 1
    _precompile(args.ranks)
    failed = []
    for what in args.what.split(","):
        try:
            multiproc.run(CHECKS[what], args.ranks, "gloo", num_gpus=num_gpus)
            print(f"== {what}: EP{args.ranks} on {num_gpus} GPU(s): PASSED", flush=True)
        except (multiproc.RankError, TimeoutError) as exc:
            print(f"== {what}: EP{args.ranks} on {num_gpus} GPU(s): FAILED\n{exc}", flush=True)
            failed.append(what)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
