"""The `epkern` command: info, precompile, cache list|clear, bench, tune, --version.

One subparser per command (build_parser), each with set_defaults(func=cmd_x). User errors
(a bad config, arch or option) print one line naming the file / field and exit 2; a cache
that cannot be used or an offline miss prints its message and exits 1; anything else is a bug
and keeps its traceback."""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time


class UsageError(Exception):
    """A mistake in the command line or the files it names: one line, exit status 2."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_info(args) -> int:
    import torch

    from epkern.codegen import cache, compiler, knobs

    rows = [("epkern", cache.epkern_version()), ("torch", torch.__version__)]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        rows.append(("GPU", f"{props.name} ({props.multi_processor_count} SMs, {_human(props.total_memory)})"))
        try:
            from cuda.bindings import driver

            driver.cuInit(0)
            err, version = driver.cuDriverGetVersion()
            rows.append(("driver (CUDA)", f"{version // 1000}.{version % 1000 // 10}"))
        except Exception as exc:  # the driver library may be missing on CPU-only machines
            rows.append(("driver (CUDA)", f"unavailable ({exc})"))
        rows.append(("GPU count", str(torch.cuda.device_count())))
    else:
        rows.append(("GPU", "none"))
    rows.append(("NVRTC", compiler.nvrtc_version()))
    rows.append(("target arch", compiler.target_arch()))
    rows.append(("JIT", "on" if knobs.jit_enabled() else "off (EPKERN_JIT=0: cache only)"))
    rows.append(("cache dir", str(knobs.cache_dir())))
    rows.append(("cache size", f"{_human(cache.total_size())} in {len(cache.list_entries())} kernels"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_precompile(args) -> int:
    from tqdm import tqdm

    from epkern.codegen import cache, compiler, jit, knobs
    from epkern.deployment import DeploymentError, load_deployments, plan
    from epkern.tuning import precompile_specs

    try:
        arch = compiler.target_arch(args.arch)
        deployments = load_deployments(args.config)
        specs, skips = plan(deployments)
        specs = precompile_specs(deployments, args.tuned, specs)  # + the tuned file's num_sms variants
    except DeploymentError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # the architecture
        raise UsageError(f"--arch: {exc}") from None
    for family, reason in skips:
        print(f"skipped {family}: {reason}", file=sys.stderr)
    if skips and args.strict:
        raise UsageError(f"{len(skips)} kernel famil{'y' if len(skips) == 1 else 'ies'} skipped for this config "
                         f"(listed above); --strict makes that an error")
    if not knobs.jit_enabled():  # precompiling is compiling: EPKERN_JIT=0 is meant for the machines that load
        print("note: EPKERN_JIT=0 is ignored by precompile", file=sys.stderr)
        os.environ["EPKERN_JIT"] = "1"
    results = []

    def build_one(spec):
        start = time.perf_counter()
        entry = jit.build(spec, arch)
        return spec, entry, time.perf_counter() - start, entry.fresh

    workers = args.jobs or max(1, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(build_one, s) for s in specs]
        for fut in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                        desc=f"precompile {arch}", unit="kernel", file=sys.stderr):
            results.append(fut.result())
    results.sort(key=lambda r: r[0].name)
    width = max([len(r[0].name) for r in results] + [6])
    print(f"{'kernel':<{width}}  {'arch':<8}  {'status':<9}  {'seconds':>8}")
    for spec, entry, seconds, compiled in results:
        status = "compiled" if compiled else "cached"
        print(f"{spec.name:<{width}}  {arch:<8}  {status:<9}  {seconds:8.3f}")
    n_compiled = sum(1 for r in results if r[3])
    print(f"{len(results)} kernels for {arch}: {n_compiled} compiled, {len(results) - n_compiled} cache hits; "
          f"cache {cache.kernels_root()}" + (f"; {len(skips)} skipped (see above)" if skips else ""))
    return 0


def cmd_cache(args) -> int:
    from epkern.codegen import cache

    if args.action == "clear":
        n = cache.clear()
        print(f"removed {n} cached kernels from {cache.kernels_root()}")
        return 0
    rows = cache.list_entries()
    if not rows:
        print(f"no cached kernels in {cache.kernels_root()}")
        return 0
    width = max(len(r["kernel"]) for r in rows)
    print(f"{'kernel':<{width}}  {'arch':<8}  {'nvrtc':<6}  {'size':>10}")
    for r in rows:
        print(f"{r['kernel']:<{width}}  {r['arch']:<8}  {r['nvrtc']:<6}  {_human(r['bytes']):>10}")
    print(f"{len(rows)} kernels, {_human(sum(r['bytes'] for r in rows))}")
    return 0


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int >= 0 (0: one per CPU)")
    return value


def build_parser() -> argparse.ArgumentParser:
    from epkern.codegen.cache import epkern_version

    parser = argparse.ArgumentParser(prog="epkern", description="epkern: JIT expert-parallel MoE kernels")
    parser.add_argument("--version", action="version", version=f"epkern {epkern_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="GPU, driver, NVRTC, target architecture, cache").set_defaults(func=cmd_info)
    pre = sub.add_parser("precompile", help="build every kernel a deployment needs into the cache")
    pre.add_argument("--config", help="JSON file: one deployment or a list (default: DeepSeek-V3, EP 2/4/8)")
    pre.add_argument("--arch", help="target, e.g. sm_90a (default: current GPU, else sm_90a)")
    pre.add_argument("--jobs", type=_jobs, default=0, help="parallel compiles (default: CPU count)")
    pre.add_argument("--strict", action="store_true",
                     help="fail if the config makes any kernel family skip part of its kernels")
    pre.add_argument("--tuned", help="tuned-config file from `epkern tune` (default: EPKERN_TUNED_CONFIG)")
    pre.set_defaults(func=cmd_precompile)
    c = sub.add_parser("cache", help="list or clear the kernel cache")
    c.add_argument("action", choices=["list", "clear"])
    c.set_defaults(func=cmd_cache)
    from epkern.bench import add_parsers as add_bench_parsers  # bench, tune (epkern/bench/cli.py)

    add_bench_parsers(sub)
    return parser


def main(argv=None) -> int:
    from epkern.codegen import MissingKernelError
    from epkern.codegen.cache import CacheLockTimeout, CacheUnusable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"epkern {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (CacheUnusable, CacheLockTimeout, MissingKernelError) as exc:
        print(f"epkern {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
