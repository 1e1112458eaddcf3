"""One `epkern bench` run: the local families, then each rank count's launch, then the files."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
from pathlib import Path

import torch

from . import impls as _impls
from . import report
from .local import RUNNERS, Context, units
from .sweep import GPU_ONLY, Plan
from .timing import device_info, git_commit, utc_now


def prebuild(plan: Plan, world: int) -> None:
    """Compile the kernels the ranks will load before starting them (ranks would take turns)."""
    from epkern import Buffer
    from epkern.codegen import compiler, jit
    from epkern.layout import LayoutSpec
    from epkern.low_latency.kernels import MAX_RANKS as LL_MAX_RANKS
    from epkern.low_latency.kernels import LowLatencySpec
    from epkern.normal import kernels as ik

    specs = []
    for m in plan.models:
        specs.append(LayoutSpec(num_experts=m.experts, num_ranks=world, num_topk=m.topk))
        if {"dispatch", "combine"} & set(plan.whats) and world <= ik.MAX_RANKS:
            specs.append(ik.notify_spec(world))
            sms_list = plan.num_sms or (Buffer.get_dispatch_config(world).num_sms,
                                        Buffer.get_combine_config(world).num_sms)
            for sms in sms_list:   # combine without weights is its top-k 0 variant
                specs += [ik.dispatch_spec(world, m.hidden, m.topk, False, sms),
                          ik.combine_spec(world, m.hidden, 0, sms), ik.combine_spec(world, m.hidden, m.topk, sms)]
        if "low_latency" in plan.whats and world <= LL_MAX_RANKS and m.hidden % 128 == 0:
            specs += [LowLatencySpec(kind, m.hidden, world, m.experts, m.topk) for kind in ("bf16", "fp8", "combine")]
    arch = compiler.target_arch()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: jit.build(s, arch), dict.fromkeys(specs)))


def run(plan: Plan, echo=print) -> dict:
    """Run the plan, write DIR/results.json, results.csv and the PNG plots; returns what was written."""
    from tqdm import tqdm

    impls = _impls.discover()
    header = {"tool": "epkern bench", "date": utc_now(), "commit": git_commit(),
              "epkern_version": _impls.epkern_version(), "device": device_info(),
              "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(plan).items()},
              "implementations": impls, "notes": []}
    skipped: list[dict] = []
    cpu = plan.device == "cpu"
    whats = []
    for w in plan.whats:
        if cpu and w in GPU_ONLY:
            skipped.append({"what": w, "impl": "", "reason": f"{GPU_ONLY[w]}; this machine has none", "failed": False})
        else:
            whats.append(w)
    plan = dataclasses.replace(plan, whats=tuple(whats))
    progress = tqdm(total=units(plan), desc="epkern bench", unit="shape", file=sys.stderr,
                    mininterval=1.0)
    ctx = Context(plan, impls, progress)
    for w in plan.local_whats:
        for model in plan.models:
            try:
                RUNNERS[w](ctx, model)
            except Exception as exc:  # recorded; the other families still run
                ctx.skip(w, f"failed at {model.label}: {type(exc).__name__}: {str(exc)[:200]}", failed=True)
    progress.close()
    if not cpu:
        torch.cuda.empty_cache()   # the ranks need the memory the local inputs held
    rows = ctx.rows
    skipped += ctx.skipped
    if plan.comm_whats:
        from .ranks import launch, mode_for

        for world in plan.ep_sizes:
            note = mode_for(world, torch.cuda.device_count() if not cpu else 0)[2]
            if note and note not in header["notes"]:
                header["notes"].append(note)
            if not cpu:
                try:
                    prebuild(plan, world)
                except Exception as exc:  # the ranks compile what is missing themselves
                    echo(f"prebuild for EP{world} failed ({exc}); the ranks compile on first use")
            try:
                r, s, note = launch(plan, impls, world)
            except Exception as exc:  # a rank died: keep what the other families measured
                skipped.append({"what": ",".join(plan.comm_whats), "impl": "", "failed": True,
                                "reason": f"EP{world} ranks failed: {type(exc).__name__}: {str(exc)[-300:]}"})
                continue
            rows += r
            skipped += s
    return write(plan, header, rows, skipped, echo)


def write(plan: Plan, header: dict, rows: list, skipped: list, echo=print) -> dict:
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    files = [report.write_json(out / "results.json", header, rows, skipped),
             report.write_csv(out / "results.csv", rows)]
    if plan.plots:
        try:
            title = f"{header['device']['name']}, epkern {header['epkern_version']}"
            files += report.write_plots(out, rows, title)
        except ImportError:
            why = "matplotlib is not installed (pip install epkern[bench])"
            skipped.append({"what": "plots", "impl": "", "reason": why, "failed": False})
            report.write_json(out / "results.json", header, rows, skipped)
    echo(report.summary(header, rows, skipped, files))
    return {"header": header, "rows": rows, "skipped": skipped, "files": files}
