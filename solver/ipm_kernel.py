"""GPU interior-point solve of the balancing LP: one block per group of ranks, one warp solving
(templates/lplb_ipm.cu.j2)."""
from __future__ import annotations

import dataclasses

import torch

from epkern.codegen import KernelSpec, check_int, get_module
from epkern.codegen.launch import current_stream_handle

from .ipm_numba import MAX_ITERATIONS, REFINE_MU, SAFE_STEP_FACTOR, STEP_FACTOR, TOLERANCE
from .topologies import MAX_DUPS, MAX_GROUP_SIZE

THREADS = 128  # per block: every warp gathers the group's token counts, warp 0 then solves


def solver_template_vars(group_size: int, dups: int, combined: int, max_iterations: int = MAX_ITERATIONS,
                         tolerance: float = TOLERANCE, profile: bool = False) -> dict:
    """What templates/lplb_ipm.cu.j2 substitutes, for the solve kernel and for the fused run that includes it."""
    return dict(group_size=group_size, dups=dups, combined=combined, max_iterations=max_iterations,
                tolerance=repr(tolerance), step_factor=repr(STEP_FACTOR), safe_step_factor=repr(SAFE_STEP_FACTOR),
                refine_mu=repr(REFINE_MU), threads=THREADS, profile=profile)


@dataclasses.dataclass(frozen=True)
class IpmSpec(KernelSpec):
    """One LP shape: group size G (ranks per group), D redundant slots per rank, and `combined`
    experts bundled per slot. Token counts and the number of groups are run-time arguments."""

    family = "lplb_ipm"
    template = "lplb_ipm.cu.j2"

    group_size: int
    dups: int
    combined: int = 1
    max_iterations: int = MAX_ITERATIONS
    tolerance: float = TOLERANCE
    profile: bool = False  # debug: clock64 stamps per phase into an extra last argument (benchmarks/lplb_profile.py)

    def validate(self) -> None:
        n = type(self).__name__
        check_int(n, "group_size", self.group_size, 2, MAX_GROUP_SIZE)
        check_int(n, "dups", self.dups, 1, MAX_DUPS)
        check_int(n, "combined", self.combined, 1, 64)
        check_int(n, "max_iterations", self.max_iterations, 1, 1000)
        if not isinstance(self.tolerance, float) or not 1e-12 <= self.tolerance <= 1e-2:
            raise ValueError(f"{n}.tolerance={self.tolerance!r}: expected a float in [1e-12, 1e-2]")
        if not isinstance(self.profile, bool):
            raise ValueError(f"{n}.profile={self.profile!r}: expected a bool")

    def template_vars(self):
        return dict(solver_template_vars(self.group_size, self.dups, self.combined, self.max_iterations,
                                         self.tolerance, self.profile), fused=False)

    def name_fields(self) -> str:
        return f"g{self.group_size}_d{self.dups}_c{self.combined}" + ("_prof" if self.profile else "")


@dataclasses.dataclass
class IpmResult:
    probs: torch.Tensor            # [n_group, G, D] float32
    global_workload: torch.Tensor  # [n_group, G, n_local_logical] float32, workload / max
    status: torch.Tensor           # [n_group] int32: 0 optimal, 1 iteration limit, 2 numerical failure
    iterations: torch.Tensor       # [n_group] int32
    objective: torch.Tensor        # [n_group] float32: the busiest rank's planned load (tokens)


SOLVE_CODES = "pipipppppppp"  # the kernel's parameters (codegen.launch.Launcher codes)
_launchers: dict = {}


def launcher(spec: IpmSpec, device: int, n_group: int):
    """The prepared launch (codegen.launch.Launcher) of the solve on n_group blocks."""
    key = (spec, device, n_group)
    found = _launchers.get(key)
    if found is None:
        found = _launchers[key] = get_module(spec, device).launcher("", n_group, THREADS, SOLVE_CODES)
    return found


def solve_cuda(spec: IpmSpec, workload: torch.Tensor, phy2log: torch.Tensor, r2o: torch.Tensor, o2r: torch.Tensor,
               prev_probs: torch.Tensor, avail_counter: torch.Tensor, n_group: int, n_fixed: int) -> IpmResult:
    """Launch the solve (arguments already validated by the Planner; all on one CUDA device).

    workload int32 [n_logical]; phy2log int32; r2o/o2r int32 [G, D]; prev_probs float32
    [n_group, G, D] (read for failed groups, overwritten for solved ones); avail_counter int32 [1]."""
    device = workload.device
    G, D = spec.group_size, spec.dups
    n_logical = workload.numel()
    probs = torch.empty(n_group, G, D, dtype=torch.float32, device=device)
    global_workload = torch.empty(n_group, G, n_logical // (n_group * G), dtype=torch.float32, device=device)
    stats = torch.empty(n_group, 2, dtype=torch.int32, device=device)
    objective = torch.empty(n_group, dtype=torch.float32, device=device)
    launcher(spec, device.index, n_group)(  # torch's current stream
        current_stream_handle(device.index), workload.data_ptr(), n_logical, phy2log.data_ptr(), n_fixed,
        r2o.data_ptr(), o2r.data_ptr(), prev_probs.data_ptr(), probs.data_ptr(), global_workload.data_ptr(),
        avail_counter.data_ptr(), stats.data_ptr(), objective.data_ptr())
    return IpmResult(probs, global_workload, stats[:, 0], stats[:, 1], objective)


def batch_layout(w: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token counts and a placement that pose N independent LPs as N groups of one solve.

    w [N, G, D], f [N, G] integer tokens -> (workload int32 [N*G*(D+1)], phy2log int32): every rank
    holds D replicated originals (bundle d = w[k, g, d]), one fixed expert (f[k, g]), D copies."""
    n, G, D = w.shape
    per_rank = torch.cat([w, f.unsqueeze(-1)], dim=-1).reshape(-1).to(torch.int32)  # logical id = rank*(D+1) + slot
    ranks = torch.arange(n * G, device=w.device).view(-1, 1)
    own = ranks * (D + 1) + torch.arange(D + 1, device=w.device)
    # copy slot d of rank (k, g) holds bundle d of rank (k, r2o[g, d]); the solver never reads it
    phy2log = torch.cat([own, own[:, :D]], dim=1).reshape(-1).to(torch.int32)
    return per_rank.contiguous(), phy2log.contiguous()


def solve_batch_cuda(w: torch.Tensor, f: torch.Tensor, r2o: torch.Tensor, prev_probs: torch.Tensor | None = None,
                     spec: IpmSpec | None = None) -> tuple[IpmResult, torch.Tensor]:
    """Solve N independent group LPs (w [N, G, D], f [N, G] integer tokens on a CUDA device) in one
    launch; for tests and benchmarks. Returns the result and the avail counter."""
    from .topologies import original_to_redundant, validate_r2o

    n, G, D = w.shape
    r2o_cpu = validate_r2o(r2o)
    spec = spec or IpmSpec(G, D, 1)
    workload, phy2log = batch_layout(w, f)
    device = w.device
    if prev_probs is None:
        prev_probs = torch.full((n, G, D), 0.5, dtype=torch.float32, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    res = solve_cuda(spec, workload, phy2log, r2o_cpu.to(device), original_to_redundant(r2o_cpu).to(device),
                     prev_probs, counter, n, 1)
    return res, counter


def deployment_specs(deployment) -> list[IpmSpec]:
    """The LPLB topologies a deployment would use: a cube of 8 (2 slots) for EP divisible by 8,
    a 16-rank hypercube for EP divisible by 16, a ring for EP 2..7; one bundled expert per slot."""
    specs = []
    for ep in deployment.ep_sizes:
        if ep % 8 == 0:
            specs.append(IpmSpec(group_size=8, dups=2))
        if ep % 16 == 0:
            specs.append(IpmSpec(group_size=16, dups=2))
        if 2 <= ep < 8:
            specs.append(IpmSpec(group_size=ep, dups=1))
    return list(dict.fromkeys(specs))
