"""Host cost of one eager epkern call: how fast Python can enqueue kernels (no GPU wait).

Run from the repository root on a GPU machine:  python3 -m benchmarks.host_overhead
Times N back-to-back calls with a host clock (the GPU work is tiny, so the host is the bottleneck),
next to an empty torch op; then times the pieces of one call on their own (spec lookup, argument
checks, output allocation, stream, launch and its parts) so the remaining cost has names; and prints
where the time goes (cProfile, top functions by own time). Writes benchmarks/results/host_overhead.json.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import time

import numpy as np
import torch

import epkern
from benchmarks.harness import Bench, summarize
from epkern import fp8, layout
from epkern.codegen import get_module, launch
from epkern.validate import check_tensor

CALLS = 2000
TARGET_US = 12  # host time per eager call (fp8 cast; layout without value checks)
PIECE_CALLS = 500  # fewer than the driver's launch queue holds, so a bare launch never waits on the GPU


def host_us(fn, rounds: int = 5, calls: int = CALLS) -> dict:
    """Per-call host time over rounds of `calls` enqueued calls (synchronized between rounds)."""
    for _ in range(50):
        fn()
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return summarize(samples)


def profile(fn, top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(CALLS):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _fp8_pieces(x: torch.Tensor) -> dict:
    """The steps of per_token_cast_to_fp8(x) (bf16, fp32 row scales), each on its own."""
    dev = x.get_device()
    num_tokens, hidden = x.shape
    cols = hidden // 128
    spec = fp8._spec(hidden, 128, "bf16", "fp32", "row")
    module = get_module(spec, dev)
    out = torch.empty((num_tokens, hidden), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((num_tokens, cols), dtype=torch.float32, device=x.device)
    grid = fp8._grid(spec, num_tokens, dev)
    args = (x, np.int64(x.stride(0)), np.int32(num_tokens), out, scales, np.int32(cols))
    entry = module.entry("cast")
    config = launch.launch_config(grid, spec.threads, 0, False)
    stream = launch.cuda_stream(launch.current_stream_handle(dev))
    packed = launch.kernel_args(args)

    def checks():
        check_tensor("x", x, dtype=tuple(fp8._DTYPES.values()), ndim=2, contiguous=False)
        fp8._check_device("x", x)
        fp8._scale_format(False, False)
        fp8.check_choice_arg("scale_layout", "row", fp8.SCALE_LAYOUTS)
        fp8._check_hidden("x", hidden, 128, False)
        fp8._check_size("x", num_tokens, hidden)
        fp8._vector_aligned(x)

    return {
        "fp8 spec lookup (memoized spec + get_module)": lambda: get_module(
            fp8._spec(hidden, 128, "bf16", "fp32", "row"), dev),
        "fp8 argument checks": checks,
        "fp8 output allocation (2x torch.empty)": lambda: (
            torch.empty((num_tokens, hidden), dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((num_tokens, cols), dtype=torch.float32, device=x.device)),
        "fp8 grid": lambda: fp8._grid(spec, num_tokens, dev),
        "stream: torch.cuda.current_stream(dev) (before)": lambda: torch.cuda.current_stream(dev),
        "stream: current_stream_handle(dev)": lambda: launch.current_stream_handle(dev),
        "stream: cuda_stream(handle) cached": lambda: launch.cuda_stream(launch.current_stream_handle(dev)),
        "launch: launch_config (cached)": lambda: launch.launch_config(grid, spec.threads, 0, False),
        "launch: kernel_args (6 args)": lambda: launch.kernel_args(args),
        "launch: cuda.core launch, all prepared": lambda: module._launch(stream, config, entry.kernel, *packed),
        "launch: LoadedModule.launch (all of it)": lambda: module.launch("cast", grid, spec.threads, *args),
    }


def _layout_pieces(topk: torch.Tensor, num_experts: int, num_ranks: int) -> dict:
    dev = topk.device
    return {
        "layout argument checks (no value check)": lambda: layout._check_layout_args(topk, num_experts, num_ranks),
        "layout output allocation (3x torch.empty)": lambda: (
            torch.empty(num_ranks, dtype=torch.int32, device=dev),
            torch.empty(num_experts, dtype=torch.int32, device=dev),
            torch.empty(topk.shape[0], num_ranks, dtype=torch.bool, device=dev)),
        "layout workspace lookup": lambda: layout._Workspace.get(layout._spec(num_experts, num_ranks, topk.shape[1]),
                                                                 dev, launch.current_stream_handle(dev.index)),
    }


def main() -> None:
    bench = Bench("host_overhead")
    x = torch.randn(128, 7168, device="cuda", dtype=torch.bfloat16)
    topk = torch.randint(0, 256, (128, 8), device="cuda")
    empty = torch.empty(1, device="cuda")
    calls = {
        "torch fill_ (one empty kernel)": lambda: empty.fill_(1.0),
        "epkern per_token_cast_to_fp8 128x7168": lambda: epkern.per_token_cast_to_fp8(x),
        "epkern get_dispatch_layout 128x8, E256 R8": lambda: epkern.get_dispatch_layout(topk, 256, 8),
    }
    saved = os.environ.get("EPKERN_CHECK_VALUES")
    for name, fn in calls.items():
        r = host_us(fn)
        bench.record(f"host {name}", {"calls": CALLS}, r)
        print(f"{name}: {r['median_us']:.2f} us per call (host)")
    os.environ["EPKERN_CHECK_VALUES"] = "0"  # the value check syncs; the pieces below are the eager path without it
    try:
        name = "epkern get_dispatch_layout 128x8, E256 R8, EPKERN_CHECK_VALUES=0"
        r = host_us(calls["epkern get_dispatch_layout 128x8, E256 R8"])
        bench.record(f"host {name}", {"calls": CALLS}, r)
        print(f"{name}: {r['median_us']:.2f} us per call (host)")
        print(f"reference: {TARGET_US} us target per call; DeepEP's C++ launches cost ~5 us. Pieces, each alone:")
        pieces = {**_fp8_pieces(x), **_layout_pieces(topk, 256, 8)}
        for name, fn in pieces.items():
            r = host_us(fn, rounds=20, calls=PIECE_CALLS)
            bench.record(f"host piece: {name}", {"calls": PIECE_CALLS}, r)
            print(f"  {name}: {r['median_us']:.2f} us")
        layout_report = profile(calls["epkern get_dispatch_layout 128x8, E256 R8"])
    finally:
        if saved is None:
            os.environ.pop("EPKERN_CHECK_VALUES", None)
        else:
            os.environ["EPKERN_CHECK_VALUES"] = saved
    report = profile(calls["epkern per_token_cast_to_fp8 128x7168"])
    print(report)
    print(layout_report)
    bench.print_table()
    print(f"saved {bench.save(meta={'profile_fp8_cast': report, 'profile_layout_no_value_check': layout_report})}")


if __name__ == "__main__":
    main()
