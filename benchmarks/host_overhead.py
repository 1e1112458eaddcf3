"""Host cost of one eager epkern call, measured alone, beside its device time and a torch op's.

Run from the repository root on a GPU machine:  python3 -m benchmarks.host_overhead
    -> benchmarks/results/host_overhead.json (rows `host epkern ...`, `host torch ...`, `host piece: ...`)
Without a GPU:  python3 -m benchmarks.host_overhead --cpu
    the Python part only: every wrapper's fast path with the launch stubbed out (cpu_stub), CPU tensors
    of the same dtypes and shapes; printed, not saved.

Host time: the GPU is kept busy behind one long kernel (torch.cuda._sleep) while CALLS calls are
enqueued, so a call's host time is never a wait for the GPU; CPU timer over the calls, median of
ROUNDS rounds. The rounds are interleaved: round r times every API and the torch baseline one after
another, so a lent host that changes speed mid-run (seen: torch.empty 3.2 us, then 6.5 us) moves them
alike; `over_torch_us` is the median over rounds of (API - torch fill_) within the round. Device time: the same call captured CALLS_PER_GRAPH times in one CUDA graph, replay
time / CALLS_PER_GRAPH. Baseline: a torch op doing one launch (fill_ of one element) measured the
same way: the issue's goal is every API's host time within 2 us of it (at most 10 us). Beside it, a
torch op that allocates its output too (neg of [128, 7168]): the floor of an API returning fresh tensors.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch

CALLS = 200            # calls per round: well inside the driver's launch queue behind the sleep
ROUNDS = 15
CALLS_PER_GRAPH = 10
SLEEP_CYCLES = 60_000_000  # ~30 ms at 2 GHz: longer than CALLS calls of any API on the host
GOAL_US = 10.0


# ---- host time with the GPU busy ---------------------------------------------------------------------
def host_samples(fns: dict, rounds: int = ROUNDS, calls: int = CALLS) -> dict:
    """name -> per-round host us per call, the rounds interleaved over every fn (see the module docstring)."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.cuda._sleep(SLEEP_CYCLES)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
            torch.cuda.synchronize()
    return samples


def device_us(bench, fn) -> dict:
    return bench.time(lambda _: fn(), [None], graph=True, calls_per_graph=CALLS_PER_GRAPH)


def profile(fn, calls: int = 2000, top: int = 14) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


# ---- the calls ---------------------------------------------------------------------------------------
def make_calls(device: str) -> dict:
    """name -> (fn, config): every API of issue 13 that has no peers, at the shapes DeepEP users run."""
    import epkern
    from epkern.solver import Planner, cube_8p2e

    calls = {}
    for tokens in (128, 4096):
        x = torch.randn(tokens, 7168, device=device, dtype=torch.bfloat16)
        calls[f"per_token_cast_to_fp8 {tokens}x7168"] = (lambda x=x: epkern.per_token_cast_to_fp8(x),
                                                         {"tokens": tokens, "hidden": 7168})
        q, s = epkern.per_token_cast_to_fp8(x)
        calls[f"per_token_cast_back {tokens}x7168"] = (lambda q=q, s=s: epkern.per_token_cast_back(q, s),
                                                       {"tokens": tokens, "hidden": 7168})
    for tokens in (128, 4096):
        topk = torch.rand(tokens, 256, device=device).topk(8, dim=1).indices.contiguous()
        calls[f"get_dispatch_layout {tokens}x8 E256 R8"] = (
            lambda t=topk: epkern.get_dispatch_layout(t, 256, 8), {"tokens": tokens, "experts": 256, "ranks": 8})
    for ep in (8, 32):
        planner = Planner(cube_8p2e().to(device), 256 + 2 * ep, 256, ep)
        idx = torch.randint(-1, 256, (4096, 8), device=device)
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        calls[f"Planner.run 4096x8 cube EP{ep}"] = (lambda p=planner, i=idx, c=counter: p.run(i, c),
                                                    {"tokens": 4096, "topk": 8, "ep": ep})
        workload = torch.randint(0, 4096, (256,), dtype=torch.int32, device=device)
        calls[f"Planner.solve_probs cube EP{ep}"] = (lambda p=planner, w=workload, c=counter: p.solve_probs(w, c),
                                                     {"ep": ep})
    return calls


def buffer_calls(group) -> dict:
    """Buffer.dispatch/combine with a cached handle and low_latency_dispatch/combine on a group of one
    (epkern.bench.local.group_of_one): the same Python path and kernels as at EP > 1, no peer to wait for."""
    import epkern

    tokens, hidden, experts, topk = 128, 7168, 256, 8
    nvl = epkern.Config().get_nvl_buffer_size_hint(hidden * 2, 1, 4096, topk)
    ll = epkern.get_low_latency_rdma_size_hint(tokens, hidden, 1, experts)
    buffer = epkern.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=ll, low_latency_mode=True, backend="nvlink",
                           timeout_s=60.0)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    topk_idx = torch.rand(tokens, experts, device="cuda").topk(topk, dim=1).indices.contiguous()
    weights = torch.rand(tokens, topk, device="cuda")
    layout = buffer.get_dispatch_layout(topk_idx, experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                                 num_tokens_per_expert=layout[2], topk_idx=topk_idx,
                                                 topk_weights=weights)
    ll_x, _, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=True)
    ll_out = torch.randn(ll_x[0].shape, device="cuda", dtype=torch.bfloat16)  # use_fp8: (rows, scales)
    config = {"tokens": tokens, "hidden": hidden, "experts": experts, "topk": topk, "ranks": 1}
    return {
        "Buffer.dispatch 128x7168 cached handle EP1": (lambda: buffer.dispatch(x, handle=handle), config),
        "Buffer.combine 128x7168 EP1": (lambda: buffer.combine(recv_x, handle), config),
        "low_latency_dispatch 128x7168 fp8 EP1": (
            lambda: buffer.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=True), config),
        "low_latency_combine 128x7168 EP1": (
            lambda: buffer.low_latency_combine(ll_out, topk_idx, weights, ll_handle), config),
        # Megatron's and the hook scheduler's way: an event in, the result's event out (DeepEP's stream order)
        "Buffer.dispatch 128x7168 cached handle EP1, previous_event + async_finish": (
            lambda: buffer.dispatch(x, handle=handle, previous_event=buffer.capture(), async_finish=True), config),
        "Buffer.get_dispatch_layout 128x8 E256 EP1": (lambda: buffer.get_dispatch_layout(topk_idx, experts), config),
    }


def pieces(device: str) -> dict:
    """The parts of a fast-path call on their own: what is left of the host time has names."""
    from epkern import fp8
    from epkern.call_plans import fresh_output
    from epkern.codegen import launch

    x = torch.randn(128, 7168, device=device, dtype=torch.bfloat16)
    fp8.per_token_cast_to_fp8(x)
    key = (x.shape, x.stride(), x.dtype, x.get_device(), 128, int, False, bool, False, bool, "row")
    plan = fp8._cast_plans[key]
    dev = torch.device(device)
    out = torch.empty(128, 7168, dtype=torch.float8_e4m3fn, device=dev)
    scales = torch.empty(128, 56, dtype=torch.float32, device=dev)
    stream = launch.current_stream_handle(dev.index or 0)
    args = (x.data_ptr(), 7168, 128, out.data_ptr(), scales.data_ptr(), 56)
    from epkern.streams import StreamOrder

    order, other = StreamOrder(dev.index or 0), torch.cuda.Stream(dev).cuda_stream
    new_out = fresh_output((128, 7168), torch.float8_e4m3fn, dev)
    return {
        "signature key + plan lookup": lambda: fp8._cast_plans.get(
            (x.shape, x.stride(), x.dtype, x.get_device(), 128, int, False, bool, False, bool, "row")),
        "torch.empty [128, 7168] fp8": lambda: torch.empty((128, 7168), dtype=torch.float8_e4m3fn, device=dev),
        "torch.empty [128, 56] fp32": lambda: torch.empty((128, 56), dtype=torch.float32, device=dev),
        "fresh_output [128, 7168] fp8 (the plans' allocation: empty_strided in a partial)": new_out,
        "one torch.empty + two views (instead of two torch.empty)": lambda: _two_views(dev),
        "current_stream_handle": lambda: launch.current_stream_handle(0),
        "Launcher call (pack + cuLaunchKernel)": lambda: plan.launch(stream, *args),
        "StreamOrder.wait (cuEventRecord + cuStreamWaitEvent)": lambda: order.wait(other, stream),
        "data_ptr x3": lambda: (x.data_ptr(), out.data_ptr(), scales.data_ptr()),
    }


def _two_views(dev):
    buf = torch.empty(128 * 7168 + 128 * 56 * 4, dtype=torch.uint8, device=dev)
    return buf[: 128 * 7168].view(128, 7168), buf[128 * 7168:].view(torch.float32)


# ---- CPU: the Python part alone ------------------------------------------------------------------------
class _FakeCode:
    def get_kernel(self, name):
        return None  # no handle: the Launcher goes to the hook


@contextlib.contextmanager
def cpu_stub(record: list | None = None, fused: bool = True):
    """Every wrapper's fast path on CPU tensors: get_module returns modules of fake kernels, each
    Launcher call goes to a hook (appending (kernel name, argument values) to `record` if given),
    the stream is 0 and the error words are fake pointers; Planner.run plans take the one-kernel run if
    `fused`, else the three kernels (the count's last-block scan). Plans are made with `seed_*` below."""
    from epkern import errors, fp8, layout
    from epkern.codegen import launch
    from epkern.codegen.runtime import LoadedModule
    from epkern.solver import ipm_kernel, map_kernel, planner, run_kernel

    def get_module(spec, device=None, arch=None):
        return LoadedModule(spec, "sm_90a", 0 if device is None or device < 0 else device, _FakeCode())

    def hook(launcher, stream, values):
        if record is not None:
            record.append((launcher.name, values))

    saved = [(m, "get_module", m.get_module) for m in (fp8, layout, ipm_kernel, map_kernel, run_kernel)]
    saved.append((LoadedModule, "all_resident", LoadedModule.all_resident))
    saved += [(m, "_raw_stream", getattr(m, "_raw_stream")) for m in (fp8, layout, planner)]
    saved += [(fp8, "_grid", fp8._grid), (errors, "site", errors.site), (map_kernel, "current_stream_handle",
                                                                         map_kernel.current_stream_handle),
              (ipm_kernel, "current_stream_handle", ipm_kernel.current_stream_handle)]
    for m in (fp8, layout, ipm_kernel, map_kernel, run_kernel):
        m.get_module = get_module
    # fused: every grid fits at once (the one-kernel run, the count's grid scan); else none does
    LoadedModule.all_resident = lambda self, entry, blocks, threads, smem=0: fused
    for m in (fp8, layout, planner):
        m._raw_stream = lambda device: 0
    map_kernel.current_stream_handle = ipm_kernel.current_stream_handle = lambda device: 0
    fp8._grid = lambda spec, num_tokens, device: 132
    errors.site = lambda device, name: (0x1000, 0x2000)
    previous = launch.set_launch_hook(hook)
    try:
        yield
    finally:
        launch.set_launch_hook(previous)
        for m, name, value in saved:
            setattr(m, name, value)
        fp8._cast_plans.clear()
        fp8._back_plans.clear()
        layout._plans.clear()


def seed_cast(x, group_size=128, round_scale=False, use_ue8m0=False, scale_layout="row"):
    """Under cpu_stub: the plan the first CUDA call would make, stored under x's signature."""
    from epkern import fp8

    fmt = fp8._scale_format(round_scale, use_ue8m0)
    spec = fp8._spec(x.shape[1], group_size, fp8._NAMES[x.dtype], fmt, scale_layout)
    cols = x.shape[1] // group_size // (4 if use_ue8m0 else 1)
    plan = fp8._CastPlan(spec, x, cols, torch.int32 if use_ue8m0 else torch.float32)
    key = (x.shape, x.stride(), x.dtype, x.get_device(), group_size, type(group_size), round_scale,
           type(round_scale), use_ue8m0, type(use_ue8m0), scale_layout)
    fp8._cast_plans[key] = plan
    return plan


def seed_cast_back(q, scales, out_dtype=torch.bfloat16):
    from epkern import fp8

    ue8m0, group_size, layout, ld = fp8._read_scale_format(scales, q.shape[0], q.shape[1])
    spec = fp8._spec(q.shape[1], group_size, fp8._NAMES[out_dtype], "ue8m0" if ue8m0 else "fp32", layout)
    plan = fp8._CastBackPlan(spec, q, ld, out_dtype)
    key = (q.shape, q.stride(), q.dtype, q.get_device(), scales.shape, scales.stride(), scales.dtype,
           scales.get_device(), out_dtype)
    fp8._back_plans[key] = plan
    return plan


def seed_layout(topk, num_experts, num_ranks):
    from epkern import errors, layout

    level = errors.check_level()
    plan = layout._Plan(layout._spec(num_experts, num_ranks, topk.shape[1]), topk.device, topk.shape[0], level)
    plan._ws[0] = type("W", (), {"partials": torch.empty(1, dtype=torch.int32),
                                 "_ticket": type("T", (), {"trusted": True, "tensor": torch.zeros(1)})()})()
    layout._plans[(topk.shape, topk.stride(), topk.dtype, topk.get_device(), num_experts, int, num_ranks, int,
                   level)] = plan
    return plan


def seed_run(planner, idx, counter, n_sms=132):
    from epkern import errors
    from epkern.solver.planner import _RunBuffers, _RunPlan

    level = errors.check_level()
    plan = _RunPlan(planner, idx, counter, n_sms, level)
    buffers = _RunBuffers.__new__(_RunBuffers)
    E = planner.n_logical_routed_experts
    buffers.by_sm = torch.empty(n_sms, E, dtype=torch.int32)
    buffers.by_sm_ptr, buffers.workload_ptr, buffers.partials_ptr = buffers.by_sm.data_ptr(), 0, 0
    buffers.count_state = type("T", (), {"trusted": True})()
    buffers.count_partials_ptr = buffers.ticket_ptr = 0
    buffers.probs = torch.empty(plan.n_group, plan.group_size, plan.dups)
    buffers.probs_ptr = buffers.probs.data_ptr()
    buffers.gw_ptr = 0
    buffers.stats = torch.zeros(plan.n_group, 2, dtype=torch.int32)
    buffers.objective = torch.zeros(plan.n_group)
    buffers.status, buffers.iterations = buffers.stats[:, 0], buffers.stats[:, 1]
    buffers.stats_ptr = buffers.objective_ptr = 0
    buffers.run_zeros = buffers.count_state
    buffers.totals_ptr = buffers.sync_ptr = 0
    buffers.spare_out = buffers.spare_solve = None
    plan.buffers[0] = buffers
    key = ("run", idx.shape, idx.stride(), idx.dtype, idx.get_device(), counter.shape, counter.dtype,
           counter.get_device(), None, type(None), level)
    planner._fast_plans()[key] = plan
    return plan


def cpu_main() -> None:
    """The Python cost of each fast path, launch stubbed, CPU tensors (CPU torch.empty is cheaper than
    CUDA's caching allocator, so this is a lower bound on the host time minus the driver's part)."""
    import epkern
    from benchmarks.harness import summarize
    from epkern.solver import Planner, cube_8p2e

    def per_call(fn, calls=20000, rounds=7):
        for _ in range(200):
            fn()
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls * 1e6)
        return summarize(samples)["median_us"]

    for fused in (True, False):
        with cpu_stub(fused=fused):
            planner = Planner(cube_8p2e(), 256 + 16, 256, 8)
            idx, counter = torch.randint(0, 256, (4096, 8)), torch.zeros(1, dtype=torch.int32)
            seed_run(planner, idx, counter)
            name = f"Planner.run 4096x8 cube EP8 ({'one kernel' if fused else 'three kernels'})"
            print(f"{name:<40} {per_call(lambda: planner.run(idx, counter)):6.2f} us per call (Python, launch stubbed)")
    with cpu_stub():
        x = torch.randn(128, 7168, dtype=torch.bfloat16)
        seed_cast(x)
        q, s = torch.empty(128, 7168, dtype=torch.float8_e4m3fn), torch.empty(128, 56)
        seed_cast_back(q, s)
        topk = torch.randint(0, 256, (128, 8))
        seed_layout(topk, 256, 8)
        empty = torch.empty(1)
        rows = {
            "torch fill_ (CPU, no launch)": lambda: empty.fill_(1.0),
            "torch.empty x1 (CPU)": lambda: torch.empty((128, 7168), dtype=torch.float8_e4m3fn),
            "per_token_cast_to_fp8 128x7168": lambda: epkern.per_token_cast_to_fp8(x),
            "per_token_cast_back 128x7168": lambda: epkern.per_token_cast_back(q, s),
            "get_dispatch_layout 128x8 E256 R8": lambda: epkern.get_dispatch_layout(topk, 256, 8),
        }
        for name, fn in rows.items():
            print(f"{name:<40} {per_call(fn):6.2f} us per call (Python, launch stubbed)")


# ---- GPU ---------------------------------------------------------------------------------------------
def main() -> None:
    import statistics

    from benchmarks.harness import Bench, summarize
    from epkern.bench.local import group_of_one

    torch.cuda.init()
    bench = Bench("host_overhead", warmup=5, repeats=50)
    empty = torch.empty(1, device="cuda")
    src = torch.empty(128, 7168, device="cuda", dtype=torch.bfloat16)
    FILL, NEG = "torch fill_ (one launch)", "torch neg [128, 7168] (one output allocated, one launch)"
    reports = {}
    with group_of_one() as group:
        apis = {**make_calls("cuda"), **buffer_calls(group)}
        fns = {FILL: lambda: empty.fill_(1.0), NEG: lambda: torch.neg(src)}
        fns.update({name: fn for name, (fn, _) in apis.items()})
        samples = host_samples(fns)
        base = summarize(samples[FILL])
        torch_us = base["median_us"]
        bench.record(f"host {FILL}", {"calls": CALLS}, base,
                     extra={"device": device_us(bench, lambda: empty.fill_(1.0))["median_us"]})
        bench.record(f"host {NEG}", {"calls": CALLS}, summarize(samples[NEG]))
        print(f"torch fill_: {torch_us:.2f} us host per call; torch neg: {summarize(samples[NEG])['median_us']:.2f}")
        for name, (fn, config) in apis.items():
            host = summarize(samples[name])
            over = statistics.median(a - b for a, b in zip(samples[name], samples[FILL]))
            try:
                device = device_us(bench, fn)["median_us"]
            except Exception as exc:  # a call that cannot be captured: no device figure
                print(f"{name}: no device time ({type(exc).__name__}: {str(exc)[:120]})")
                device = None
            bench.record(f"host epkern {name}", {**config, "calls": CALLS}, host,
                         extra={"device_us": device, "torch_op_us": torch_us, "over_torch_us": over,
                                "goal_us": GOAL_US, "met": host["median_us"] <= GOAL_US,
                                "within_2us_of_torch": over <= 2.0})
            print(f"{name:<44} host {host['median_us']:6.2f} us (torch op {torch_us:.2f}, +{over:5.2f}), device "
                  f"{device if device is None else round(device, 2)} us")
        for name in ("Buffer.dispatch 128x7168 cached handle EP1", "Buffer.combine 128x7168 EP1",
                     "low_latency_dispatch 128x7168 fp8 EP1", "low_latency_combine 128x7168 EP1"):
            reports[f"profile {name}"] = profile(apis[name][0], calls=500)
    pieces_fns = pieces("cuda")
    for name, found in host_samples(pieces_fns).items():
        r = summarize(found)
        bench.record(f"host piece: {name}", {"calls": CALLS}, r)
        print(f"  piece {name:<56} {r['median_us']:6.2f} us")
    calls = make_calls("cuda")
    reports.update({f"profile {name}": profile(calls[name][0]) for name in
                    ("per_token_cast_to_fp8 128x7168", "get_dispatch_layout 128x8 E256 R8",
                     "Planner.run 4096x8 cube EP8")})
    for name, text in reports.items():
        print(name)
        print(text)
    bench.print_table()
    print(f"saved {bench.save(meta=reports)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the Python part only, launch stubbed (no GPU)")
    if parser.parse_args().cpu:
        cpu_main()
    else:
        main()
