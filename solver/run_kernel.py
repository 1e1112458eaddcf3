"""Planner.run as one cooperative kernel: count, solve and map as phases of one grid
(templates/lplb_run.cu.j2). Three launches cost three kernel latencies plus the gaps between them;
in one grid the count's tail, the solve's gather and the map's prefix overlap, and the map waits
only for the plan. Used by Planner.run without a process group (an all-reduce between count and
solve needs the separate kernels); the result is bit-identical to count_cuda + solve_cuda + map_cuda.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from epkern.codegen import KernelSpec, check_int, get_module

from . import ipm_kernel, map_kernel
from .topologies import MAX_DUPS, MAX_GROUP_SIZE

THREADS = ipm_kernel.THREADS  # one block size for every phase: the solve's
RUN_CODES = "pqppp" + "pipp" + "pppppp" + "i" + "ppp" + "pp"  # the kernel's parameters (codegen.launch.Launcher)


SYNC_WORDS = 8  # the kernel's counters: {arrived, solved} of two sets, the parity, a timed-out flag
TOTAL_COPIES = 8  # copies of the totals the blocks add into (block b into copy b % 8), so ~16 atomics, not
                  # ~130, queue on one address ahead of the grid barrier (the solve sums the copies)


def sync_offset(num_experts: int) -> int:
    """int32 words before the counters in the kernel's state: two sets of TOTAL_COPIES totals [E]."""
    return 2 * TOTAL_COPIES * num_experts


def state_words(num_experts: int) -> int:
    """int32 words of the kernel's state, zero before its first launch (it keeps them usable after):
    the totals, then the counters (pass state + sync_offset(E) as `sync`)."""
    return sync_offset(num_experts) + SYNC_WORDS


@dataclasses.dataclass(frozen=True)
class RunSpec(KernelSpec):
    family = "lplb_run"
    template = "lplb_run.cu.j2"

    group_size: int
    dups: int
    combined: int
    num_experts: int  # logical experts E
    profile: bool = False  # debug: per-block phase stamps into an extra last argument (benchmarks/lplb_run_profile.py)

    def validate(self) -> None:
        n = type(self).__name__
        check_int(n, "group_size", self.group_size, 2, MAX_GROUP_SIZE)
        check_int(n, "dups", self.dups, 1, MAX_DUPS)
        check_int(n, "combined", self.combined, 1, 64)
        check_int(n, "num_experts", self.num_experts, 1, map_kernel.MAX_EXPERTS)
        if THREADS // 32 * self.num_experts * 4 > map_kernel.SMEM_BUDGET:
            raise ValueError(f"{n}.num_experts={self.num_experts}: the per-warp counters need more than "
                             f"{map_kernel.SMEM_BUDGET} bytes of shared memory")
        if not isinstance(self.profile, bool):
            raise ValueError(f"{n}.profile={self.profile!r}: expected a bool")

    def template_vars(self):
        return dict(ipm_kernel.solver_template_vars(self.group_size, self.dups, self.combined, profile=self.profile),
                    fused=True, num_experts=self.num_experts, align=map_kernel.ALIGN, total_copies=TOTAL_COPIES)

    def name_fields(self) -> str:
        return f"g{self.group_size}_d{self.dups}_c{self.combined}_e{self.num_experts}" + ("_prof" if self.profile else "")

    @property
    def smem(self) -> int:
        return THREADS // 32 * self.num_experts * 4


@functools.lru_cache(maxsize=64)
def run_spec(group_size: int, dups: int, combined: int, num_experts: int) -> RunSpec:
    return RunSpec(group_size, dups, combined, num_experts)


_launchers: dict = {}


def fits(spec: RunSpec, device: int, n_sms: int, n_group: int) -> bool:
    """Whether n_sms blocks can all be resident at once (a cooperative launch needs it) and hold every group."""
    return n_sms >= n_group and get_module(spec, device).all_resident("", n_sms, THREADS, spec.smem)


def launcher(spec: RunSpec, device: int, n_sms: int):
    key = (spec, device, n_sms)
    found = _launchers.get(key)
    if found is None:
        found = _launchers[key] = get_module(spec, device).launcher("", n_sms, THREADS, RUN_CODES, smem=spec.smem,
                                                                    cooperative=True)
    return found


def deployment_specs(deployment) -> list[RunSpec]:
    """The fused runs of the LPLB topologies ipm_kernel.deployment_specs lists, for the deployment's experts."""
    return [RunSpec(s.group_size, s.dups, s.combined, deployment.num_experts)
            for s in ipm_kernel.deployment_specs(deployment)
            if THREADS // 32 * deployment.num_experts * 4 <= map_kernel.SMEM_BUDGET]
