"""Start the ranks: one process per GPU (torch.multiprocessing spawn, a free TCP port on loopback).

  ranks <= GPUs  NCCL, rank r on GPU r: timings mean what they say
  ranks >  GPUs  gloo, rank r on GPU r % GPUs: the ranks share GPUs, the GPU time-slices between
                 their kernels: correctness only (SHARED_NOTE is printed and stored)
  no GPU         gloo on CPU: the torch backend only
Each rank writes its rows to a file after every case; rank 0's rows are the results, with the
slowest rank's median beside each (`slowest_rank_median_us`). When a rank dies (a crash inside
another implementation, say), the rows written until then are kept and the failure is recorded.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import socket
import sys
import tempfile
from pathlib import Path

SHARED_NOTE = "ranks share GPUs: correctness only, timings are time-slicing"


@dataclasses.dataclass
class Job:
    plan: object
    impls: list
    world: int
    port: int
    backend: str          # nccl | gloo
    num_gpus: int
    shared: bool
    device_name: str
    out_dir: str
    only_epkern: bool = False   # epkern tune: our NVLink kernels only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mode_for(world: int, num_gpus: int) -> tuple[str, bool, str | None]:
    """(process-group backend, ranks share GPUs, the note to print) for `world` ranks on `num_gpus`."""
    if num_gpus == 0:
        return "gloo", False, f"no GPU: {world} ranks on CPU over gloo (torch backend only)"
    if world <= num_gpus:
        return "nccl", False, None
    return "gloo", True, f"{SHARED_NOTE} ({world} ranks on {num_gpus} GPU{'s' if num_gpus > 1 else ''})"


def _rank_main(rank: int, job: Job) -> None:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from .comm import run_comm
    from .local import Context

    if job.num_gpus:
        torch.cuda.set_device(rank % job.num_gpus)
    else:
        torch.set_num_threads(1)
    kw = {"device_id": torch.device("cuda", rank)} if job.backend == "nccl" else {}
    dist.init_process_group(job.backend, init_method=f"tcp://127.0.0.1:{job.port}", rank=rank,
                            world_size=job.world, timeout=datetime.timedelta(seconds=300), **kw)
    try:
        ctx = Context(job.plan, job.impls)
        progress = functools.partial(tqdm, desc=f"EP{job.world} ranks", unit="step", file=sys.stderr,
                                     mininterval=1.0, disable=rank != 0)
        path = Path(job.out_dir, f"rank{rank}.json")

        def flush():
            path.with_suffix(".tmp").write_text(json.dumps({"rows": ctx.rows, "skipped": ctx.skipped}))
            path.with_suffix(".tmp").replace(path)

        run_comm(ctx, job, progress, flush)
        flush()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(plan, impls: list, world: int, only_epkern: bool = False) -> tuple[list, list, str | None]:
    """Run the plan's multi-rank cases on `world` ranks: (rows, skipped, note)."""
    import torch
    import torch.multiprocessing as mp

    from .local import unchecked_values

    num_gpus = torch.cuda.device_count() if plan.device == "cuda" else 0
    backend, shared, note = mode_for(world, num_gpus)
    name = torch.cuda.get_device_name(0) if num_gpus else "cpu"
    if shared:  # time-sliced kernels wait for each other: fewer calls, the same checks
        plan = dataclasses.replace(plan, warmup=min(plan.warmup, 2), repeats=min(plan.repeats, 10))
    died = None
    with tempfile.TemporaryDirectory(prefix="epkern-bench-") as tmp:
        job = Job(plan, impls, world, free_port(), backend, num_gpus, shared, name, tmp, only_epkern)
        with unchecked_values():   # the ranks inherit it
            try:
                mp.spawn(_rank_main, args=(job,), nprocs=world, join=True)
            except Exception as exc:  # a rank died: keep what every rank wrote before
                died = f"EP{world} ranks failed: {type(exc).__name__}: {str(exc)[-300:]}"
        files = [Path(tmp, f"rank{r}.json") for r in range(world)]
        if died and not all(f.exists() for f in files):
            raise RuntimeError(died)
        results = [json.loads(f.read_text()) for f in files]
    rows = results[0]["rows"]
    if all(len(r["rows"]) == len(rows) for r in results):
        for i, row in enumerate(rows):
            row["slowest_rank_median_us"] = max(r["rows"][i]["median_us"] for r in results)
    skipped = list({json.dumps(s, sort_keys=True): s for r in results for s in r["skipped"]}.values())
    if died:
        skipped.append({"what": ",".join(plan.comm_whats), "impl": "", "reason": died, "failed": True})
    if shared:
        for row in rows:
            row["note"] = (row.get("note", "") + "; " if row.get("note") else "") + SHARED_NOTE
    return rows, skipped, note
