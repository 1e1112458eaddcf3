"""Warp-split sweep for the NVLink dispatch/combine kernels at 24 SMs (EP=2, 4096 tokens, hidden 7168).

    python3 -m benchmarks.intranode_sweep     (2 GPUs; results -> benchmarks/results/intranode_sweep.json)

The kernels are latency-bound per warp (time falls with SMs, far from the NVLink floor), so the
question is how time moves with the number of sender and receiver/reducer warps per block.
Kernel times from the profiler, as in benchmarks/intranode.py.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from benchmarks.harness import Bench, summarize
from benchmarks.intranode import HIDDEN, NUM_EXPERTS, kernel_times_us, make_inputs
from epkern.testing import multiproc

SMS = 24
DISPATCH_SPLITS = [(12, 6), (16, 8)]
COMBINE_SPLITS = [(8, 24), (6, 24), (8, 20)]


def run(rank: int, world: int) -> None:
    import epkern.buffer as B
    import epkern.normal.kernels as ik

    bench = Bench("intranode_sweep", warmup=5, repeats=30)
    buf = B.Buffer(dist.group.WORLD, num_nvl_bytes=int(1e9), backend="nvlink")
    x, x_fp8, topk_idx, _ = make_inputs(4096, rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                              num_tokens_per_expert=per_expert)
    nbytes = recv_x.shape[0] * HIDDEN * 2
    config = B.Config(SMS)
    default = (ik.DISPATCH_WARPS, ik.COMBINE_WARPS)
    cases = [("dispatch_bf16", "DISPATCH_WARPS", s, lambda: buf.dispatch(x, handle=handle, config=config), "_dispatch")
             for s in DISPATCH_SPLITS]
    cases += [("dispatch_fp8", "DISPATCH_WARPS", s, lambda: buf.dispatch(x_fp8, handle=handle, config=config),
               "_dispatch") for s in DISPATCH_SPLITS]
    cases += [("combine_bf16", "COMBINE_WARPS", s, lambda: buf.combine(recv_x, handle, config=config), "_combine")
              for s in COMBINE_SPLITS]
    for kind, knob, split, fn, kernel in cases:
        setattr(ik, knob, split)
        timing = summarize(kernel_times_us(fn, kernel))
        row = bench.record(f"{kind} sms={SMS} warps={split[0]}+{split[1]}", {"kind": kind, "num_sms": SMS,
                           "send_warps": split[0], "recv_warps": split[1], "num_tokens": 4096}, timing,
                           bytes_moved=nbytes if "bf16" in kind else int(nbytes / 2 * (1 + 4 / 128)))
        if rank == 0:
            print(f"{kind:14s} warps {split[0]:2d}+{split[1]:2d}: {timing['median_us']:7.1f} us "
                  f"[p10 {timing['p10_us']:.1f}, p90 {timing['p90_us']:.1f}] {row['bandwidth_gbs']:6.1f} GB/s", flush=True)
    ik.DISPATCH_WARPS, ik.COMBINE_WARPS = default
    if rank == 0:
        bench.save()
    buf.destroy()


def main() -> None:
    os.environ.setdefault("EPKERN_CHECK_VALUES", "0")
    multiproc.run(run, 2, "nccl")


if __name__ == "__main__":
    main()
