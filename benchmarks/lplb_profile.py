"""Where one LPLB solve's cycles go: per-phase clock64 stamps from the IPM kernel's PROFILE variant.

    python3 -m benchmarks.lplb_profile                       # the current template
    python3 -m benchmarks.lplb_profile --alt OLD.cu.j2       # and another version of it, side by side

For each benchmark case (benchmarks/lplb.py's planners and workloads) it prints the cycles of the
prologue (gather, scale), of each phase of every iteration of the slowest group (top -> verdict:
residuals, reductions and the convergence test; scaling: reciprocals and M's rows; sweep; predictor:
its direction; sigma: step lengths and the centring parameter; corrector: its direction; step: step
lengths and the update), of the epilogue, the SM clock (stamps / globaltimer) and, from the kernel
without stamps, the device time per call over CUDA-graph replays. Stamps cost a few cycles each and
the compiler may move independent work across them: phases are approximate, totals are not.
--alt renders another template text (e.g. `git show COMMIT:templates/lplb_ipm.cu.j2`) that has the
same arguments and PROFILE stamps, under its own family name.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib

import numpy as np
import torch

from benchmarks.lplb import CALLS, SOLVE_CASES, make_planner, workloads
from epkern.codegen import get_module
from epkern.codegen import render as _render
from epkern.solver import ipm_kernel
from epkern.solver.ipm_kernel import THREADS, IpmSpec

PROF_ITERS, PROF_PHASES = 16, 8  # as in templates/lplb_ipm.cu.j2
PROF_START, PROF_GATHERED, PROF_SCALED, PROF_ITER0 = 0, 1, 2, 3
PROF_IPM_END = PROF_ITER0 + PROF_ITERS * PROF_PHASES
PROF_END, PROF_NS_START, PROF_NS_END = PROF_IPM_END + 1, PROF_IPM_END + 2, PROF_IPM_END + 3
PROF_SLOTS = PROF_IPM_END + 4
PHASES = ("verdict", "scaling", "sweep", "predictor", "sigma", "corrector", "step", "loop")
_ALT_TEXT: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class AltIpmSpec(IpmSpec):
    """The IPM kernel rendered from another template text (registered in _ALT_TEXT under `alt`)."""

    family = "lplb_ipm_alt"
    alt: str = ""

    def render(self) -> str:
        variables = dict(self.template_vars(), symbol=self.symbol)
        return _render.environment().from_string(_ALT_TEXT[self.alt]).render(**variables)


def spec_for(planner, alt: str | None, profile: bool) -> IpmSpec:
    args = (planner.group_size, planner.num_redundants, planner.combined_redundant_experts)
    return AltIpmSpec(*args, profile=profile, alt=alt) if alt else IpmSpec(*args, profile=profile)


_buffers: dict = {}


def launch(planner, spec, workload, prof=None):
    """One solve launch, outputs in buffers kept per planner (no allocation or memset in a graph)."""
    n_fixed = planner.n_local_logical_routed_experts - planner.combined_redundant_experts * planner.num_redundants
    device = workload.device
    G, D, n = planner.group_size, planner.num_redundants, planner.n_group
    bufs = _buffers.get(id(planner))
    if bufs is None:
        bufs = _buffers[id(planner)] = (
            torch.empty(n, G, D, dtype=torch.float32, device=device),
            torch.empty(workload.numel(), dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
            torch.empty(n, 2, dtype=torch.int32, device=device),
            torch.empty(n, dtype=torch.float32, device=device))
    probs, gw, counter, stats, objective = bufs
    args = [workload, np.int32(workload.numel()), planner.phy2log, np.int32(n_fixed), planner.r2o, planner.o2r,
            planner._prev_probs, probs, gw, counter, stats, objective]
    if prof is not None:
        args.append(prof)
    get_module(spec, device.index).launch("", n, THREADS, *args)
    return stats


def profile_case(planner, spec, inputs) -> dict:
    """Stamps of every input; the slowest group of each; phases averaged over iterations and inputs."""
    per_phase = np.zeros(len(PHASES))
    n_iter_total = 0
    rows, pro, epi, totals, mhz, iters = [], [], [], [], [], []
    for w in inputs:
        prof = torch.zeros(planner.n_group, PROF_SLOTS, dtype=torch.int64, device=w.device)
        stats = launch(planner, spec, w, prof)
        torch.cuda.synchronize()
        p = prof.cpu().numpy()
        st = stats.cpu().numpy()
        g = int(np.argmax(p[:, PROF_END] - p[:, PROF_START]))
        k = int(st[g, 1])
        iters.append(k)
        c = p[g]
        pro.append([c[PROF_GATHERED] - c[PROF_START], c[PROF_SCALED] - c[PROF_GATHERED]])
        it_rows = []
        for i in range(min(k, PROF_ITERS - 1)):
            s = c[PROF_ITER0 + i * PROF_PHASES: PROF_ITER0 + (i + 1) * PROF_PHASES + 1].copy()
            if i == k - 1 or i == PROF_ITERS - 2:  # the last stamped iteration ends where the next one begins
                s[-1] = c[PROF_ITER0 + (i + 1) * PROF_PHASES]
            it_rows.append(np.diff(s))
        last_top = c[PROF_ITER0 + min(k, PROF_ITERS - 1) * PROF_PHASES]
        epi.append([c[PROF_ITER0] - c[PROF_SCALED], c[PROF_IPM_END] - last_top, c[PROF_END] - c[PROF_IPM_END]])
        rows.append(np.array(it_rows))
        per_phase += np.array(it_rows).sum(0)
        n_iter_total += len(it_rows)
        totals.append(c[PROF_END] - c[PROF_START])
        mhz.append(totals[-1] / max(c[PROF_NS_END] - c[PROF_NS_START], 1) * 1e3)
    per_phase /= max(n_iter_total, 1)
    pro, epi = np.mean(pro, 0), np.mean(epi, 0)
    return {"iterations": iters, "cycles_total": float(np.mean(totals)), "sm_mhz": float(np.median(mhz)),
            "prologue": {"gather": float(pro[0]), "scale": float(pro[1])},
            "ipm_start": float(epi[0]), "last_verdict": float(epi[1]), "epilogue": float(epi[2]),
            "per_iteration": {name: float(v) for name, v in zip(PHASES, per_phase)},
            "iteration_total": float(per_phase.sum()),
            "first_input_iterations": [[int(x) for x in r] for r in rows[0]]}


def time_case(planner, spec, inputs, replays: int = 50) -> float:
    """Device time per call of the kernel without stamps: a CUDA graph of CALLS launches, replayed."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in inputs:  # warm up (module load) outside the capture
            launch(planner, spec, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(CALLS):
                launch(planner, spec, inputs[i % len(inputs)])
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(replays):
            graph.replay()
        end.record(stream)
        end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * CALLS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alt", action="append", default=[], help="another template text to profile (repeatable)")
    parser.add_argument("--cases", default="", help="substring filter on the case names")
    args = parser.parse_args()
    versions = [("current", None)]
    for path in args.alt:
        key = pathlib.Path(path).stem
        _ALT_TEXT[key] = pathlib.Path(path).read_text()
        versions.append((key, key))
    results = []
    for name, topology, ep, red in SOLVE_CASES:
        if args.cases and args.cases not in name:
            continue
        planner = make_planner(topology, ep, red, "cuda")
        inputs = [w.cuda() for w in workloads(8, seed=ep)]
        for label, alt in versions:
            prof = profile_case(planner, spec_for(planner, alt, True), inputs)
            us = time_case(planner, spec_for(planner, alt, False), inputs)
            results.append({"case": name, "version": label, "us_per_call": us, **prof})
            ph = prof["per_iteration"]
            print(f"{name:<20} {label:<10} {us:6.1f} us/call | iterations {prof['iterations']} | "
                  f"{prof['cycles_total']:7.0f} cycles at {prof['sm_mhz']:.0f} MHz | gather {prof['prologue']['gather']:.0f}"
                  f" scale {prof['prologue']['scale']:.0f} start {prof['ipm_start']:.0f}"
                  f" last verdict {prof['last_verdict']:.0f} epilogue {prof['epilogue']:.0f}", flush=True)
            print(f"{'':<31} per iteration {prof['iteration_total']:6.0f}: "
                  + " ".join(f"{k} {v:.0f}" for k, v in ph.items()), flush=True)
    out = os.environ.get("OUT")
    if out:
        path = pathlib.Path(out) / "lplb_profile.json"
        path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))
        print(f"saved {path}")


if __name__ == "__main__":
    main()
