"""Intranode dispatch/combine benchmark: EP=2 over NVLink, DeepEP's setting and figures alongside.

    torchrun --nproc_per_node 2 -m benchmarks.intranode      (or: python -m benchmarks.intranode)
    python -m benchmarks.intranode --sweep                   token-count sweep only (see sweep())

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
import sys
from pathlib import Path

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


SWEEP_TOKENS = (4096, 16384, 65536)


def call_spans_us(fn, name: str, iters: int = 10, warmup: int = 2) -> list[float]:
    """Per call of fn: from the start of its first kernel named *name* to the end of its last (a
    streamed call launches one kernel per round; the gaps between rounds count)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if name in e.name and e.device_type.name == "CUDA")
    if not kernels or len(kernels) % iters:
        raise RuntimeError(f"{len(kernels)} kernels named *{name}* in {iters} calls")
    per_call = len(kernels) // iters
    return [kernels[i + per_call - 1][1] - kernels[i][0] for i in range(0, len(kernels), per_call)]


def sweep(rank: int, world: int, shared_gpu: bool) -> None:
    """Streaming: 4,096, 16,384 and 65,536 tokens per rank through the buffer DeepEP's two-argument
    size hint gives (sized for 4,096 tokens per rank), 24 SMs, cached dispatch (BF16, FP8) and
    combine, each call's rounds timed from its first kernel's start to its last kernel's end, plus
    the full dispatch (notify, host sync, rounds) end to end. Rows are merged into
    benchmarks/results/intranode.json (same names replaced). Ranks sharing one GPU (shared_gpu)
    time-slice it: those times only show that it runs."""
    import json

    import epkern.buffer as B
    from benchmarks.harness import RESULTS_DIR, git_commit

    bench = Bench("intranode", warmup=2, repeats=10)
    num_nvl_bytes = B.Config().get_nvl_buffer_size_hint(HIDDEN * 2, world)
    buf = B.Buffer(dist.group.WORLD, num_nvl_bytes=num_nvl_bytes, backend="nvlink")
    backend = buf._backend
    config = B.Config(24)
    log = print if rank == 0 else (lambda *a, **k: None)
    for num_tokens in SWEEP_TOKENS:
        x, x_fp8, topk_idx, topk_weights = make_inputs(num_tokens, rank)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, config=config, **layout)
        num_recv = recv_x.shape[0]
        launches = backend.launches
        buf.dispatch(x, handle=handle, config=config)
        dispatch_rounds = backend.launches - launches
        launches = backend.launches
        buf.combine(recv_x, handle, config=config)
        combine_rounds = backend.launches - launches
        cases = [("dispatch_bf16", lambda: buf.dispatch(x, handle=handle, config=config), "_dispatch",
                  num_recv * HIDDEN * 2, dispatch_rounds),
                 ("dispatch_fp8", lambda: buf.dispatch(x_fp8, handle=handle, config=config), "_dispatch",
                  int(num_recv * HIDDEN * (1 + 4 / 128)), dispatch_rounds),
                 ("combine_bf16", lambda: buf.combine(recv_x, handle, config=config), "_combine",
                  num_recv * HIDDEN * 2, combine_rounds)]
        for kind, fn, kernel, nbytes, num_rounds in cases:
            timing = summarize(call_spans_us(fn, kernel))
            extra = {"rounds": num_rounds, "num_nvl_bytes": num_nvl_bytes, "shared_gpu": shared_gpu}
            row = bench.record(f"nvlink {kind} T={num_tokens} sms=24 hint-buffer", {
                "backend": "nvlink", "kind": kind, "num_tokens": num_tokens, "num_sms": 24, "hidden": HIDDEN,
                "topk": NUM_TOPK, "experts": NUM_EXPERTS, "ep": world, "buffer": "two-argument size hint"},
                timing, bytes_moved=nbytes, extra=extra)
            log(f"T={num_tokens:6d} {kind:14s} {num_rounds:3d} round(s) {timing['median_us']:9.1f} us "
                f"{row['bandwidth_gbs']:7.1f} GB/s", flush=True)
        timing = bench.time(lambda _: buf.dispatch(x, config=config, **layout), [None], repeats=10)
        bench.record(f"nvlink dispatch_bf16 end-to-end T={num_tokens} sms=24 hint-buffer", {
            "backend": "nvlink", "kind": "dispatch_bf16_e2e", "num_tokens": num_tokens, "num_sms": 24,
            "buffer": "two-argument size hint"}, timing, bytes_moved=num_recv * HIDDEN * 2,
            extra={"rounds": dispatch_rounds, "shared_gpu": shared_gpu})
        log(f"T={num_tokens:6d} dispatch bf16 end-to-end {timing['median_us']:9.1f} us", flush=True)
    if rank == 0:
        path = RESULTS_DIR / "intranode.json"
        doc = json.loads(path.read_text()) if path.exists() else {"kernel": "intranode", "rows": []}
        names = {r["name"] for r in bench.rows}
        doc["rows"] = [r for r in doc["rows"] if r["name"] not in names] + bench.rows
        doc["sweep"] = {"commit": git_commit(), "tokens": list(SWEEP_TOKENS), "shared_gpu": shared_gpu,
                        "num_nvl_bytes": num_nvl_bytes}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        out = os.environ.get("OUT")
        if out:
            Path(out, path.name).write_text(path.read_text())
        bench.print_table()
    buf.destroy()


def _spawned(rank: int, world: int, init_file: str, what: str = "run") -> None:
    num_gpus = torch.cuda.device_count()
    shared = num_gpus < world
    torch.cuda.set_device(rank % num_gpus)
    if shared:   # NCCL refuses two ranks on one GPU; the NVLink backend takes any group
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    else:
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
    try:
        if what == "sweep":
            sweep(rank, world, shared)
        else:
            run(rank, world)
    finally:
        dist.destroy_process_group()


def main() -> None:
    os.environ.setdefault("EPKERN_CHECK_VALUES", "0")   # DeepEP does not sync to check ids either
    if "--sweep" in sys.argv[1:]:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(2, os.path.join(tmp, "init"), "sweep"), nprocs=2, join=True)
        return
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
