"""The benchmark scripts' runner: epkern.bench.timing (CUDA events, graph replays, the copy floor,
result rows), with results saved under benchmarks/results/ by default.

    from benchmarks.harness import Bench
    bench = Bench("fp8_cast")                       # results -> benchmarks/results/fp8_cast.json

See epkern/bench/timing.py for the timing rules; `epkern bench` uses the same code.
"""
from __future__ import annotations

from pathlib import Path

from epkern.bench import timing as _timing
from epkern.bench.timing import device_info, floor_fields, git_commit, summarize

__all__ = ["RESULTS_DIR", "Bench", "device_info", "floor_fields", "git_commit", "summarize"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Bench(_timing.Bench):
    def __init__(self, kernel: str, warmup: int = 10, repeats: int = 100):
        super().__init__(kernel, warmup, repeats, results_dir=RESULTS_DIR)
