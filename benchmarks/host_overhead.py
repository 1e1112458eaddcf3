"""Host cost of one eager epkern call: how fast Python can enqueue kernels (no GPU wait).

Run from the repository root on a GPU machine:  python3 -m benchmarks.host_overhead
Times N back-to-back calls with a host clock (the GPU work is tiny, so the host is the bottleneck),
next to an empty torch op, and prints where the time goes (cProfile, top functions by own time).
Writes benchmarks/results/host_overhead.json.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

import epkern
from benchmarks.harness import Bench, summarize

CALLS = 2000


def host_us(fn, rounds: int = 5) -> dict:
    """Per-call host time over rounds of CALLS enqueued calls (synchronized between rounds)."""
    for _ in range(50):
        fn()
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        samples.append((time.perf_counter() - start) / CALLS * 1e6)
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
    for name, fn in calls.items():
        r = host_us(fn)
        bench.record(f"host {name}", {"calls": CALLS}, r)
        print(f"{name}: {r['median_us']:.2f} us per call (host)")
    report = profile(calls["epkern per_token_cast_to_fp8 128x7168"])
    print(report)
    bench.print_table()
    print(f"saved {bench.save(meta={'profile_fp8_cast': report})}")


if __name__ == "__main__":
    main()
