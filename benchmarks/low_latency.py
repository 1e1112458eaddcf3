"""Low-latency dispatch/combine on 2 GPUs (EP=2), DeepEP's figures beside ours.

    python3 -m benchmarks.low_latency [--tokens 1,32,128,256] [--num-sms 32]

Per token count: dispatch (FP8), combine (BF16) and dispatch + combine are timed with CUDA events
over CUDA-graph replays of CALLS back-to-back calls (benchmarks.harness, graph=True), so the time
per call is device time with both ranks in step, not host launch time or the drift between the two
processes' launches. The send and receive halves with hooks are kernel durations from the
profiler: each send starts after a device barrier across the ranks (so a send that waits for its
peer, as combine's does for the weights, is not charged the other process's lateness) and each
receive after a large GEMM as in DeepEP's own test, so it finds the data already there. Rank 0
writes benchmarks/results/low_latency.json.

Extension rows: dispatch with topk_weights= (the weights travel in the header: +32 bytes per
message at top-8), combine of that handle (its send waits for no rank; the hook halves are also
timed as "(weights carried)"), and combine with use_logfmt=True on expert outputs below 1 (so every
group is LogFMT-encoded: 160 instead of 256 bytes per 128 channels).

Floor: one message per (token, other rank holding one of its experts) crosses NVLink (nearly every
token at EP=2, top-8); those bytes over the measured one-direction NVLink copy rate (393 GB/s,
REFERENCE.md) give the floor rows. DeepEP sends one message per (token, expert): "remote_copies".
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from epkern.testing import multiproc

H, E, K = 7168, 256, 8
M = 256
CALLS = 10   # calls per captured graph (even: the two alternating buffers end where they began)
NVLINK_ONE_WAY = 393e9
DEEPEP = {"dispatch": 29.0, "combine": 40.0, "dispatch_send": 19.4, "dispatch_recv": 8.2,
          "combine_send": 32.5, "combine_recv": 9.7, "dispatch+combine": 92.0}   # us, 128 tokens, REFERENCE.md


def _inputs(rank: int, tokens: int):
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(tokens, H, generator=g, device="cuda").to(torch.bfloat16) * 0.1
    scores = torch.rand(tokens, E, generator=g, device="cuda")
    topk_idx = torch.topk(scores, K, dim=-1).indices
    weights = torch.rand(tokens, K, generator=g, device="cuda")
    return x, topk_idx, weights


def _kernel_times(buf, x, topk_idx, weights, gemm_x, iters: int = 20, carry: bool = False) -> dict:
    """Send/receive kernel durations (us) with hooks, from the profiler (carry: dispatch carries the
    top-k weights, so combine's send does not wait for the other rank's)."""
    a = torch.randn(4096, 4096, device="cuda")

    def aligned():  # the GPU sleeps while the host queues the barrier and the send behind it
        torch.cuda._sleep(200_000)
        buf._barrier()

    def once():
        aligned()
        _, _, handle, _, hook = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True, return_recv_hook=True,
                                                         topk_weights=weights if carry else None)
        a @ a
        hook()
        aligned()
        _, _, hook = buf.low_latency_combine(gemm_x, topk_idx, weights, handle, return_recv_hook=True)
        a @ a
        hook()

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            once()
        torch.cuda.synchronize()
    sums: dict = {}
    for ev in prof.events():
        name = ev.name
        if not name.startswith("low_latency_") or name.endswith("_barrier"):
            continue
        key = ("combine" if "_combine_" in name else "dispatch") + ("_send" if name.endswith("_send") else "_recv")
        sums.setdefault(key, []).append(ev.time_range.elapsed_us())
    return {k: sorted(v)[len(v) // 2] for k, v in sums.items()}


def _worker(rank: int, num_ranks: int, tokens_list: list[int], num_sms: int, name: str):
    from benchmarks.harness import Bench
    from epkern.low_latency import LowLatencyBuffer, get_low_latency_rdma_size_hint, logfmt
    from epkern.low_latency.kernels import LowLatencySpec

    buf = LowLatencyBuffer(dist.group.WORLD, get_low_latency_rdma_size_hint(M, H, num_ranks, E), timeout_s=20.0,
                           num_sms=num_sms)
    bench = Bench(name, warmup=10, repeats=60)
    L = E // num_ranks
    fp8_msg = LowLatencySpec("fp8", H, num_ranks, E, K).message_bytes
    for tokens in tokens_list:
        x, topk_idx, weights = _inputs(rank, tokens)
        recv, count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True)
        gemm_x = torch.randn(L, num_ranks * M, H, device="cuda").to(torch.bfloat16)
        remote = int(((topk_idx >= 0) & (topk_idx // L != rank)).sum())
        copies = int((topk_idx >= 0).sum())
        on_rank = torch.zeros(tokens, num_ranks, dtype=torch.bool, device="cuda")
        on_rank.scatter_(1, (topk_idx // L).clamp(min=0), topk_idx >= 0)
        remote_messages = int(on_rank.sum()) - int(on_rank[:, rank].sum())
        cfg = {"tokens": tokens, "max_tokens": M, "hidden": H, "experts": E, "topk": K, "ranks": num_ranks,
               "num_sms": num_sms}
        dist.barrier()
        timings = {
            "dispatch": bench.time(lambda _: buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True), [None],
                                   graph=True, calls_per_graph=CALLS),
            "combine": bench.time(lambda _: buf.low_latency_combine(gemm_x, topk_idx, weights, handle), [None],
                                  graph=True, calls_per_graph=CALLS),
        }

        def both(_):
            _, _, h, _, _ = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True)
            buf.low_latency_combine(gemm_x, topk_idx, weights, h)

        timings["dispatch+combine"] = bench.time(both, [None], graph=True, calls_per_graph=CALLS // 2)

        # extensions: weights carried by dispatch (no rendezvous in combine), LogFMT combine rows
        # (expert outputs below 1, so that DeepEP's rule encodes every group)
        _, _, handle_w, _, _ = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True, topk_weights=weights)
        gemm_small = gemm_x * 0.01
        timings["dispatch (weights carried)"] = bench.time(
            lambda _: buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True, topk_weights=weights), [None],
            graph=True, calls_per_graph=CALLS)
        timings["combine (weights carried)"] = bench.time(
            lambda _: buf.low_latency_combine(gemm_x, topk_idx, weights, handle_w), [None], graph=True,
            calls_per_graph=CALLS)
        timings["combine logfmt"] = bench.time(
            lambda _: buf.low_latency_combine(gemm_small, topk_idx, weights, handle, use_logfmt=True), [None],
            graph=True, calls_per_graph=CALLS)
        halves = _kernel_times(buf, x, topk_idx, weights, gemm_x)
        halves.update({f"{k} (weights carried)": v
                       for k, v in _kernel_times(buf, x, topk_idx, weights, gemm_x, carry=True).items()})
        fp8_msg_w = LowLatencySpec("fp8", H, num_ranks, E, K, carry_weights=True).message_bytes
        logfmt_row = logfmt.meta_bytes(H) + logfmt.ENCODED_GROUP_BYTES * (H // 128) + 2 * (H % 128)
        floors = {"dispatch": remote_messages * fp8_msg / NVLINK_ONE_WAY * 1e6,
                  "combine": remote_messages * 2 * H / NVLINK_ONE_WAY * 1e6,
                  "dispatch (weights carried)": remote_messages * fp8_msg_w / NVLINK_ONE_WAY * 1e6,
                  "combine (weights carried)": remote_messages * 2 * H / NVLINK_ONE_WAY * 1e6,
                  "combine logfmt": remote_messages * logfmt_row / NVLINK_ONE_WAY * 1e6}
        for name, t in timings.items():
            extra = {"deepep_us_128_tokens": DEEPEP.get(name), "rank": rank, "copies": copies, "remote_copies": remote,
                     "remote_messages": remote_messages}
            if name in floors:
                extra["nvlink_floor_us"] = floors[name]
            bench.record(f"{name} T={tokens}", cfg, t, extra=extra)
        for name, us in halves.items():
            t = {"median_us": us, "mean_us": us, "min_us": us, "p10_us": us, "p90_us": us, "stdev_us": 0.0, "repeats": 20}
            bench.record(f"{name} (hook, kernel) T={tokens}", cfg, t,
                         extra={"deepep_us_128_tokens": DEEPEP.get(name), "rank": rank, "source": "profiler kernel time"})
        dist.barrier()
    if rank == 0:
        bench.print_table()
        for row in bench.rows:
            if row.get("deepep_us_128_tokens"):
                print(f"  {row['name']:<40} ours {row['timing']['median_us']:7.2f} us   DeepEP@128 {row['deepep_us_128_tokens']:6.1f} us"
                      + (f"   NVLink floor {row['nvlink_floor_us']:.1f} us" if "nvlink_floor_us" in row else ""))
        bench.save(meta={"deepep_v1_2_1_us_128_tokens": DEEPEP, "note": "EP=2 on 2 x H200, FP8 dispatch, BF16 combine"})
    dist.barrier()
    buf.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,32,128,256")
    parser.add_argument("--num-sms", type=int, default=132)
    parser.add_argument("--name", default="low_latency", help="results file benchmarks/results/NAME.json")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    multiproc.run(_worker, 2, "nccl", tokens, args.num_sms, args.name)


if __name__ == "__main__":
    main()
