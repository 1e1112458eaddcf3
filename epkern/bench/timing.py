"""Timing and result rows for every epkern benchmark: CUDA events, graph replays, the copy floor.

Usage (the scripts in benchmarks/ and `epkern bench` share it):

    bench = Bench("fp8_cast")
    copy_bw = bench.copy_bandwidth()                # measured device-to-device, bytes read+written / s
    inputs = bench.rotating(lambda: make_inputs(), footprint_bytes)   # sets that together exceed L2
    r = bench.time(lambda x: kernel(x), inputs)     # {'median_us', 'p10_us', 'p90_us', 'min_us', ...}
    bench.record("cast 8192x7168", config={...}, timing=r, bytes_moved=n, floor_bw=copy_bw, extra={...})
    bench.save(path)

`time` warms up, then times each repeat with its own pair of CUDA events,
rotating through the input sets so repeated runs do not measure L2.
`graph=True` captures the call into a CUDA graph first and times replays, for
small or many-launch kernels; with `calls_per_graph=N` one graph holds N calls
back to back (cycling the inputs) and the time per call is the replay's / N:
device time, free of the host's launch cost and of the event pair's own cost.
`time_host` is the same loop with the host clock, for CPU tensors.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import time as _time
from pathlib import Path
from typing import Callable

import torch


def git_commit(where: Path | None = None) -> str:
    """EPKERN_COMMIT when set (a run from an archived tree without .git names its commit so); else the
    short commit of the checkout holding `where` (default: this file), '-dirty' if modified; else
    'unknown' (an installed wheel)."""
    named = os.environ.get("EPKERN_COMMIT", "").strip()
    if named:
        return named
    cwd = Path(where or __file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=cwd, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def driver_version() -> str:
    """The CUDA driver's version, e.g. '13.0', or why there is none."""
    try:
        from cuda.bindings import driver

        driver.cuInit(0)
        err, version = driver.cuDriverGetVersion()
        if int(err) != 0:
            return f"unavailable (error {int(err)})"
        return f"{version // 1000}.{version % 1000 // 10}"
    except Exception as exc:  # no driver library on CPU-only machines
        return f"unavailable ({type(exc).__name__})"


def device_info() -> dict:
    """The GPU (or 'cpu'), torch, CUDA and driver versions: the header of every results file."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        return dict(info, name="cpu", count=0, cpus=os.cpu_count(), driver="none")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return dict(info, name=props.name, sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1),
                l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), count=torch.cuda.device_count(),
                driver=driver_version())


def summarize(samples_us: list[float]) -> dict:
    s = sorted(samples_us)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"median_us": statistics.median(s), "mean_us": statistics.fmean(s), "min_us": s[0],
            "p10_us": q(0.10), "p90_us": q(0.90), "stdev_us": statistics.pstdev(s), "repeats": len(s)}


class Bench:
    """Times calls and collects result rows; `save` writes them with device, date and commit."""

    def __init__(self, kernel: str, warmup: int = 10, repeats: int = 100, results_dir: Path | None = None):
        self.kernel = kernel
        self.warmup = warmup
        self.repeats = repeats
        self.results_dir = results_dir
        self.rows: list[dict] = []
        self._copy_bw: float | None = None

    # -- inputs ------------------------------------------------------------------------------------
    @staticmethod
    def l2_bytes() -> int:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 64 << 20) or (64 << 20))

    def rotating(self, make: Callable[[], object], footprint_bytes: int, min_sets: int = 2, max_sets: int = 16):
        """Enough independent input sets (from make()) that one pass over them exceeds 3x L2."""
        n = max(min_sets, min(max_sets, -(-3 * self.l2_bytes() // max(1, footprint_bytes))))
        return [make() for _ in range(n)]

    # -- timing ------------------------------------------------------------------------------------
    def time(self, fn: Callable, inputs: list, graph: bool = False, repeats: int | None = None,
             calls_per_graph: int = 1) -> dict:
        """Per-call time. Eager: events around each call (host launch cost included when the host is
        slower than the kernel). graph=True: each replay runs calls_per_graph captured calls (cycling the
        inputs) back to back, so with calls_per_graph > 1 the time per call is device time alone."""
        repeats = repeats or self.repeats
        if graph:
            return self._time_graph(fn, inputs, repeats, calls_per_graph)
        for i in range(self.warmup):
            fn(inputs[i % len(inputs)])
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            fn(inputs[i % len(inputs)])
            ends[i].record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])

    def _time_graph(self, fn: Callable, inputs: list, repeats: int, calls_per_graph: int) -> dict:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                fn(inputs[i % len(inputs)])
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs = []
        for first in range(len(inputs) if calls_per_graph == 1 else 1):  # one long graph cycles them all
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(calls_per_graph):
                    fn(inputs[(first + i) % len(inputs)])
            graphs.append(g)
        for i in range(self.warmup):
            graphs[i % len(graphs)].replay()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            graphs[i % len(graphs)].replay()
            ends[i].record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) * 1e3 / calls_per_graph for s, e in zip(starts, ends)])

    def time_pair(self, first: Callable, second: Callable, repeats: int | None = None,
                  between: Callable | None = None) -> tuple[dict, dict]:
        """Per-call times of two calls that must alternate (a dispatch and the combine that belongs to
        it): each iteration runs first() then second(), each between its own pair of CUDA events on
        the current stream, eager (host launch cost included when the host is slower than the kernels);
        between() (a sync and a barrier, say) runs after each iteration, outside both timings."""
        repeats = repeats or self.repeats
        for _ in range(self.warmup):
            first()
            second()
            if between is not None:
                between()
        torch.cuda.synchronize()
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(repeats)]
        for e in events:
            e[0].record()
            first()
            e[1].record()
            e[2].record()
            second()
            e[3].record()
            if between is not None:
                between()
        torch.cuda.synchronize()
        return (summarize([e[0].elapsed_time(e[1]) * 1e3 for e in events]),
                summarize([e[2].elapsed_time(e[3]) * 1e3 for e in events]))

    def time_pair_host(self, first: Callable, second: Callable, repeats: int | None = None,
                       between: Callable | None = None) -> tuple[dict, dict]:
        """time_pair with the host clock (CPU tensors)."""
        repeats = repeats or self.repeats
        samples: tuple[list, list] = ([], [])
        for i in range(self.warmup + repeats):
            for fn, out in ((first, samples[0]), (second, samples[1])):
                start = _time.perf_counter()
                fn()
                if i >= self.warmup:
                    out.append((_time.perf_counter() - start) * 1e6)
            if between is not None:
                between()
        return summarize(samples[0]), summarize(samples[1])

    def time_host(self, fn: Callable, inputs: list, repeats: int | None = None) -> dict:
        """Per-call wall time on the host clock (CPU tensors; a CUDA call is synchronized after each)."""
        repeats = repeats or self.repeats
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        for i in range(self.warmup):
            fn(inputs[i % len(inputs)])
        sync()
        samples = []
        for i in range(repeats):
            start = _time.perf_counter()
            fn(inputs[i % len(inputs)])
            sync()
            samples.append((_time.perf_counter() - start) * 1e6)
        return summarize(samples)

    def copy_bandwidth(self, nbytes: int = 1 << 30) -> float:
        """Measured device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
        if self._copy_bw is None:
            src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
            dst = torch.empty_like(src)
            r = self.time(lambda _: dst.copy_(src), [None], repeats=20)
            self._copy_bw = 2 * nbytes / (r["median_us"] * 1e-6)
            self.rows.append({"name": "device copy (ceiling)", "config": {"bytes": nbytes}, "timing": r,
                              "bandwidth_gbs": self._copy_bw / 1e9})
        return self._copy_bw

    def empty_launch_us(self) -> float:
        """Median time of a trivial kernel launch (torch's fill on 1 element), for launch-bound shapes."""
        t = torch.empty(1, device="cuda")
        return self.time(lambda _: t.fill_(1.0), [None])["median_us"]

    # -- results -----------------------------------------------------------------------------------
    def record(self, name: str, config: dict, timing: dict, bytes_moved: int | None = None,
               floor_bw: float | None = None, extra: dict | None = None) -> dict:
        """One result row; with bytes_moved and floor_bw it adds achieved bandwidth, floor time and fraction."""
        row = {"name": name, "config": config, "timing": timing}
        row.update(floor_fields(timing["median_us"], bytes_moved, floor_bw))
        if extra:
            row.update(extra)
        self.rows.append(row)
        return row

    def save(self, path: Path | None = None, meta: dict | None = None) -> Path:
        if path is None:
            if self.results_dir is None:
                raise ValueError("Bench.save: pass path= or construct Bench with results_dir=")
            path = Path(self.results_dir) / f"{self.kernel}.json"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"kernel": self.kernel, "date": utc_now(), "commit": git_commit(), "device": device_info(),
               "rows": self.rows}
        if meta:
            doc.update(meta)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        out = os.environ.get("OUT")
        if out:  # the device tool brings back what is under $OUT
            Path(out, path.name).write_text(path.read_text())
        return path

    def print_table(self) -> None:
        print(f"\n== {self.kernel} ==")
        for r in self.rows:
            t = r["timing"]
            line = f"{r['name']:<48} median {t['median_us']:9.2f} us  [p10 {t['p10_us']:.2f}, p90 {t['p90_us']:.2f}]"
            if "bandwidth_gbs" in r:
                line += f"  {r['bandwidth_gbs']:8.1f} GB/s"
            if "fraction_of_floor" in r:
                line += f"  {100 * r['fraction_of_floor']:5.1f}% of floor"
            print(line)


def floor_fields(median_us: float, bytes_moved: int | None, floor_bw: float | None) -> dict:
    """bytes_moved, bandwidth_gbs, floor_us and fraction_of_floor for a median time (those that apply)."""
    out: dict = {}
    if bytes_moved is None or not median_us > 0:
        return out
    out["bytes_moved"] = bytes_moved
    out["bandwidth_gbs"] = bytes_moved / (median_us * 1e-6) / 1e9
    if floor_bw:
        out["floor_us"] = bytes_moved / floor_bw * 1e6
        out["fraction_of_floor"] = out["floor_us"] / median_us
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
