"""Where the one-kernel Planner.run's and the count's time goes: per-block phase stamps of the PROFILE
variants of lplb_run and of lplb_map's count_grid.

    python3 -m benchmarks.lplb_run_profile        ->  $OUT/lplb_run_profile.json when OUT is set

For cube 8x2 at EP 8 and 32, 4096 x top-8 random ids (benchmarks/lplb.py's run rows), a CUDA graph of
CALLS runs (each with its own stamp buffer) is replayed; every block's thread 0 stamps globaltimer and
clock64 at the phase boundaries (start, counted, arrived, solved, prefixed, plan seen, end), and the
solve blocks add lplb_ipm's per-iteration clock64 stamps. Printed per phase, over the calls after the
first: when the first / median / last block reached it (us after the first block started), the gap
from the previous call's last block to this call's first, the solve's gather, iterations and epilogue
(cycles converted with the block's own clock rate), and the device time per call of the kernel without
stamps. The count (Planner.count_workload's kernel, count_grid) is stamped the same way: start,
counted, published (its tagged row stored), end (its columns scanned).
Stamps cost a few cycles each; the compiler may move independent work across them.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import torch

from benchmarks.harness import Bench
from benchmarks.lplb import CALLS, make_planner
from benchmarks.lplb_profile import PROF_END, PROF_GATHERED, PROF_IPM_END, PROF_ITER0, PROF_SCALED, PROF_SLOTS, PROF_START
from epkern.codegen import get_module
from epkern.solver import cube_8p2e, map_kernel, run_kernel

STAMPS = ("start", "counted", "arrived", "solved", "prefixed", "plan_seen", "end")  # templates/lplb_run.cu.j2
COUNT_STAMPS = ("start", "counted", "published", "end")  # templates/lplb_map.cu.j2 (count_grid)
REPLAYS = 20


def profile_launcher(planner, n_sms: int):
    spec = run_kernel.RunSpec(planner.group_size, planner.num_redundants, planner.combined_redundant_experts,
                              planner.n_logical_routed_experts, profile=True)
    return get_module(spec, torch.cuda.current_device()).launcher(
        "", n_sms, run_kernel.THREADS, run_kernel.RUN_CODES + "p", smem=spec.smem, cooperative=True)


def fused_plan(planner):
    plans = [p for p in planner._fast_plans().values() if getattr(p, "fused_launch", None) is not None]
    if not plans:
        raise RuntimeError("Planner.run did not take the one-kernel path (EPKERN_LPLB_FUSED=0, or not every block fits)")
    return plans[0]


def graph_us(fn, inputs) -> float:
    """Median device us per call of fn over inputs: graphs of CALLS calls, replayed (benchmarks.lplb's rule)."""
    return Bench("lplb_run_profile", warmup=3, repeats=REPLAYS).time(fn, inputs, graph=True,
                                                                     calls_per_graph=CALLS)["median_us"]


def stamped_calls(planner, inputs, counter, n_sms: int) -> list[np.ndarray]:
    """[calls] of int64 arrays: CALLS stamped runs back to back in one graph, after warm-up replays."""
    plan = fused_plan(planner)
    unstamped = plan.fused_launch
    stamped = profile_launcher(planner, n_sms)
    words = 2 * n_sms * len(STAMPS) + planner.n_group * PROF_SLOTS
    bufs = [torch.zeros(words, dtype=torch.int64, device="cuda") for _ in range(CALLS)]
    turn = iter(range(10**9))
    plan.fused_launch = lambda stream, *args: stamped(stream, *args, bufs[next(turn) % CALLS].data_ptr())
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(CALLS):
                planner.run(inputs[i % len(inputs)], counter)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    finally:
        plan.fused_launch = unstamped
    return [b.cpu().numpy() for b in bufs]


def stamped_counts(inputs, n_sms: int, num_experts: int) -> list[np.ndarray]:
    """[calls] of count_grid's stamps: CALLS stamped counts back to back in one graph, after warm-up replays."""
    spec = map_kernel.MapSpec(num_experts, map_kernel.map_threads(num_experts), profile=True)
    device = torch.cuda.current_device()
    stamped = get_module(spec, device).launcher("count_grid", n_sms, spec.threads, "pqppppp" + "p",
                                                smem=4 * num_experts, cooperative=True)
    by_sm = torch.empty(n_sms, num_experts, dtype=torch.int32, device="cuda")
    bufs = [torch.zeros(2 * n_sms * len(COUNT_STAMPS), dtype=torch.int64, device="cuda") for _ in range(CALLS)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stream = torch.cuda.current_stream().cuda_stream
        state, tagged, ticket = map_kernel.count_scratch(stamped, torch.device("cuda", device), stream, n_sms,
                                                         num_experts)
        state.get()
        for i in range(CALLS):
            x = inputs[i % len(inputs)]
            stamped(stream, x.data_ptr(), x.numel(), by_sm.data_ptr(), tagged, ticket, 0, 0,
                    bufs[i].data_ptr())
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return [b.cpu().numpy() for b in bufs]


def timeline(calls: list[np.ndarray], n_sms: int, names: tuple) -> tuple[dict, float, list]:
    """Per stamp, median over the calls after the first of [first, median, last] block (us after the
    call's first block started); the median gap from the previous call's last block; per call (ns, clk)."""
    k = len(names)
    reached = {name: [] for name in names}
    gaps, clocks = [], []
    prev_end = None
    for c in calls:
        run = c[: 2 * n_sms * k].reshape(n_sms, k, 2)
        ns, clk = run[:, :, 0].astype(np.float64), run[:, :, 1].astype(np.float64)
        clocks.append((ns, clk))
        t0 = ns[:, 0].min()
        for j, name in enumerate(names):
            rel = (ns[:, j] - t0) / 1e3
            reached[name].append([rel.min(), np.median(rel), rel.max()])
        if prev_end is not None:
            gaps.append((t0 - prev_end) / 1e3)
        prev_end = ns[:, -1].max()
    steady = slice(1, None)  # the first call of a replay follows the previous replay's launch gap
    out = {name: np.median(np.array(v)[steady], axis=0).round(2).tolist() for name, v in reached.items()}
    return out, float(np.median(gaps)), clocks


def summarize(calls: list[np.ndarray], n_sms: int, n_group: int) -> dict:
    k = len(STAMPS)
    reached, gap, clocks = timeline(calls, n_sms, STAMPS)
    gather, ipm, iter_us, epilogue = [], [], [], []
    for c, (ns, clk) in zip(calls, clocks):
        ipm_stamps = c[2 * n_sms * k:].reshape(n_group, PROF_SLOTS).astype(np.float64)
        for g in range(n_group):  # cycles -> us at this block's own clock rate
            rate = (clk[g, -1] - clk[g, 0]) / max(ns[g, -1] - ns[g, 0], 1.0) * 1e3  # cycles per us
            s = ipm_stamps[g]
            gather.append((s[PROF_GATHERED] - s[PROF_START]) / rate)
            ipm.append((s[PROF_IPM_END] - s[PROF_SCALED]) / rate)
            epilogue.append((s[PROF_END] - s[PROF_IPM_END]) / rate)
            iter_us.append((s[PROF_ITER0 + 8] - s[PROF_ITER0]) / rate)
    return {"reached_us_first_median_last": reached, "gap_from_previous_call_us": gap,
            "solve_gather_us": float(np.median(gather)), "solve_ipm_us": float(np.median(ipm)),
            "first_iteration_us": float(np.median(iter_us)), "solve_epilogue_us": float(np.median(epilogue))}


def main() -> None:
    torch.cuda.init()
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(11)
    results = []
    for ep in (8, 32):
        planner = make_planner(cube_8p2e, ep, 2, "cuda")
        inputs = [torch.randint(-1, 256, (4096, 8), device="cuda", generator=gen) for _ in range(4)]
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")
        planner.run(inputs[0], counter)  # compile, check, plan
        us = graph_us(lambda x: planner.run(x, counter), inputs)
        iterations = planner.last_iterations.cpu().tolist()
        summary = summarize(stamped_calls(planner, inputs, counter, n_sms), n_sms, planner.n_group)
        results.append({"case": f"run cube8x2 EP{ep} 4096x8", "us_per_call": us, "iterations": iterations, **summary})
        print(f"EP{ep}: {us:.2f} us/call (unstamped), iterations {iterations}, "
              f"gap {summary['gap_from_previous_call_us']:.2f} us", flush=True)
        for name, (first, med, last) in summary["reached_us_first_median_last"].items():
            print(f"  {name:<10} first {first:6.2f}  median {med:6.2f}  last {last:6.2f}")
        print(f"  solve: gather {summary['solve_gather_us']:.2f} us, ipm {summary['solve_ipm_us']:.2f} us "
              f"(first iteration {summary['first_iteration_us']:.2f}), epilogue {summary['solve_epilogue_us']:.2f}")
    inputs = [torch.randint(-1, 256, (4096, 8), device="cuda", generator=gen) for _ in range(4)]
    us = graph_us(lambda x: map_kernel.count_cuda(x, 256, n_sms), inputs)
    calls = stamped_counts(inputs, n_sms, 256)
    reached, gap, _ = timeline(calls, n_sms, COUNT_STAMPS)
    results.append({"case": "count 4096x8", "us_per_call": us, "reached_us_first_median_last": reached,
                    "gap_from_previous_call_us": gap})
    print(f"count 4096x8: {us:.2f} us/call (unstamped), gap {gap:.2f} us", flush=True)
    for name, (first, med, last) in reached.items():
        print(f"  {name:<10} first {first:6.2f}  median {med:6.2f}  last {last:6.2f}")
    out = os.environ.get("OUT")
    if out:
        path = pathlib.Path(out) / "lplb_run_profile.json"
        path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))
        print(f"saved {path}")


if __name__ == "__main__":
    main()
