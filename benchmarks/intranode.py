"""Intranode dispatch/combine benchmark: EP=2 over NVLink, DeepEP's setting and figures alongside.

    torchrun --nproc_per_node 2 -m benchmarks.intranode      (or: python -m benchmarks.intranode)

Hidden 7168, top-8 of 256 experts (random scores), 4096 / 512 / 128 tokens per rank. Kernel time
comes from the profiler (CUPTI), as DeepEP's bench_kineto measures it; bandwidth counts bytes
received by a rank, its own tokens included (FP8: hidden x (1 + 4/128) bytes per token). The NVLink
floor is the bytes that cross NVLink (rows from the other rank) at the copy engine's 393 GB/s one
way (and at 260 GB/s, its per-direction share when both directions run, as they do here).
The portable backend (NCCL all_to_all_single, host sync included) is timed end to end.
Results -> benchmarks/results/intranode.json (rank 0).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from benchmarks.harness import Bench, summarize

HIDDEN, NUM_EXPERTS, NUM_TOPK = 7168, 256, 8
ONE_WAY_BW, BOTH_WAYS_BW = 393e9, 260e9
DEEPEP_24SM = {"dispatch_bf16": (336, 348.0), "dispatch_fp8": (254, 237.5), "combine_bf16": (389, 300.6)}
NCCL_BASELINE = {4096: 586, 128: 342}
QUEUE_AHEAD_CYCLES = 100_000_000   # ~50 ms of GPU sleep before the profiled calls


def kernel_times_us(fn, name: str, iters: int = 30, warmup: int = 5) -> list[float]:
    """Durations of every kernel whose name contains `name` over `iters` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        # keep the GPU busy while the host queues every call: the kernels then run back to back
        # on both ranks, and a kernel's time is its own, not the wait for a host slower than it
        # (each launch starts with a barrier on the peer's launch)
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = [e.time_range.elapsed_us() for e in prof.events() if name in e.name and e.device_type.name == "CUDA"]
    if not times:
        raise RuntimeError(f"no kernel named *{name}* was profiled")
    return times


def make_inputs(num_tokens: int, rank: int):
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    x = torch.randn(num_tokens, HIDDEN, dtype=torch.bfloat16, device="cuda", generator=gen)
    scores = torch.randn(num_tokens, NUM_EXPERTS, device="cuda", generator=gen).abs() + 1
    topk_idx = torch.topk(scores, NUM_TOPK, dim=-1).indices.to(torch.int64)
    topk_weights = torch.rand(num_tokens, NUM_TOPK, device="cuda", generator=gen)
    scales = x.float().view(num_tokens, -1, 128).abs().amax(-1).clamp(min=1e-4) / 448
    fp8 = (x.float().view(num_tokens, -1, 128) / scales.unsqueeze(-1)).view(num_tokens, HIDDEN)
    return x, (fp8.to(torch.float8_e4m3fn), scales.contiguous()), topk_idx, topk_weights


def run(rank: int, world: int) -> None:
    import epkern.buffer as B

    bench = Bench("intranode", warmup=5, repeats=30)
    group = dist.group.WORLD
    nvl = B.Buffer(group, num_nvl_bytes=int(1e9), backend="nvlink")
    portable = B.Buffer(group, num_nvl_bytes=int(1e9), backend="torch")
    log = print if rank == 0 else (lambda *a, **k: None)

    for num_tokens in (4096, 512, 128):
        x, x_fp8, topk_idx, topk_weights = make_inputs(num_tokens, rank)
        per_rank, _, per_expert, in_rank, _ = nvl.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        recv_x, _, _, _, handle, _ = nvl.dispatch(x, **layout)
        num_recv = recv_x.shape[0]
        rank_prefix = handle[0].cpu()
        remote_rows = num_recv - int(rank_prefix[rank, rank] - (rank_prefix[rank - 1, rank] if rank else 0))
        bytes_bf16 = num_recv * HIDDEN * 2
        bytes_fp8 = int(num_recv * HIDDEN * (1 + 4 / 128))
        remote = {"bf16": remote_rows * HIDDEN * 2, "fp8": int(remote_rows * HIDDEN * (1 + 4 / 128))}
        sms_list = (8, 16, 24, 32) if num_tokens == 4096 else (24,)
        for sms in sms_list:
            config = B.Config(sms)
            cases = [("dispatch_bf16", lambda: nvl.dispatch(x, handle=handle, config=config), "_dispatch", bytes_bf16, "bf16"),
                     ("dispatch_fp8", lambda: nvl.dispatch(x_fp8, handle=handle, config=config), "_dispatch", bytes_fp8, "fp8"),
                     ("combine_bf16", lambda: nvl.combine(recv_x, handle, config=config), "_combine", bytes_bf16, "bf16")]
            for kind, fn, kernel, nbytes, dtype in cases:
                samples = kernel_times_us(fn, kernel)
                timing = summarize(samples)
                floor_us = remote[dtype] / ONE_WAY_BW * 1e6
                extra = {"floor_us": floor_us, "fraction_of_floor": floor_us / timing["median_us"],
                         "floor_both_ways_us": remote[dtype] / BOTH_WAYS_BW * 1e6, "remote_bytes": remote[dtype]}
                if sms == 24 and num_tokens == 4096:
                    t, bw = DEEPEP_24SM[kind]
                    extra.update(deepep_us=t, deepep_gbs=bw, speedup_vs_deepep=t / timing["median_us"])
                row = bench.record(f"nvlink {kind} T={num_tokens} sms={sms}", {"backend": "nvlink", "kind": kind,
                                   "num_tokens": num_tokens, "num_sms": sms, "hidden": HIDDEN, "topk": NUM_TOPK,
                                   "experts": NUM_EXPERTS, "ep": world}, timing, bytes_moved=nbytes, extra=extra)
                log(f"T={num_tokens:5d} sms={sms:3d} {kind:14s} {timing['median_us']:8.1f} us "
                    f"{row['bandwidth_gbs']:7.1f} GB/s  floor {floor_us:6.1f} us ({100 * extra['fraction_of_floor']:.0f}%)"
                    + (f"  DeepEP {extra['deepep_us']} us -> x{extra['speedup_vs_deepep']:.2f}" if "deepep_us" in extra else ""),
                    flush=True)

        # end to end, host sync for the counts included: NVLink (notify + dispatch) and the portable backend
        def full(buf):
            return lambda _: buf.dispatch(x, **layout)

        for name, buf in (("nvlink", nvl), ("torch", portable)):
            timing = bench.time(full(buf), [None])
            extra = {"nccl_baseline_us": NCCL_BASELINE.get(num_tokens)} if name == "torch" else {}
            bench.record(f"{name} dispatch_bf16 end-to-end T={num_tokens}", {"backend": name, "kind": "dispatch_bf16_e2e",
                         "num_tokens": num_tokens}, timing, bytes_moved=bytes_bf16, extra=extra)
            log(f"T={num_tokens:5d} {name:7s} dispatch bf16 end-to-end {timing['median_us']:8.1f} us", flush=True)
        pr_x, _, _, _, pr_handle, _ = portable.dispatch(x, **layout)
        timing = bench.time(lambda _: portable.combine(pr_x, pr_handle), [None])
        bench.record(f"torch combine_bf16 end-to-end T={num_tokens}", {"backend": "torch", "kind": "combine_bf16_e2e",
                     "num_tokens": num_tokens}, timing, bytes_moved=bytes_bf16)
        log(f"T={num_tokens:5d} torch   combine bf16 end-to-end {timing['median_us']:8.1f} us", flush=True)

    if rank == 0:
        bench.save(meta={"deepep_v1_2_1_24sm": DEEPEP_24SM, "nccl_all_to_all_us": NCCL_BASELINE,
                         "nvlink_one_way_gbs": ONE_WAY_BW / 1e9, "nvlink_both_ways_gbs": BOTH_WAYS_BW / 1e9})
        bench.print_table()
    nvl.destroy()
    portable.destroy()


def main() -> None:
    os.environ.setdefault("EPKERN_CHECK_VALUES", "0")   # DeepEP does not sync to check ids either
    if "RANK" in os.environ:   # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        try:
            run(rank, world)
        finally:
            dist.destroy_process_group()
        return
    from epkern.testing import multiproc

    multiproc.run(run, 2, "nccl")


if __name__ == "__main__":
    main()
