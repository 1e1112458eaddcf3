"""Counting logical ids per SM chunk and mapping them to physical ids (templates/lplb_map.cu.j2).

CPU tensors run the torch definitions below, which are also the oracles for the kernels:
`count_reference` cuts idx into the kernels' chunks; `map_reference` sends the k-th occurrence
(flat order, from 0) of a replicated expert with kept share p to the original iff
floor((k + 1) p) > floor(k p), else to the replica.
"""
from __future__ import annotations

import dataclasses

import functools

import torch

from epkern import errors
from epkern.codegen import KernelSpec, check_int, get_module
from epkern.codegen.launch import current_stream_handle
from epkern.codegen.scratch import SelfResettingZeros

ALIGN = 256           # chunk starts are multiples of this many ids
SMEM_BUDGET = 64 << 10  # bytes of per-warp rank counters the map kernel may use
MAX_EXPERTS = SMEM_BUDGET // 4


def map_threads(num_experts: int) -> int:
    """The most warps (up to 8) whose [warps, E] int32 counters fit the shared-memory budget."""
    for threads in (256, 128, 64, 32):
        if threads // 32 * num_experts * 4 <= SMEM_BUDGET:
            return threads
    raise ValueError(f"num_logical_experts={num_experts}: at most {MAX_EXPERTS} are supported")


@dataclasses.dataclass(frozen=True)
class MapSpec(KernelSpec):
    family = "lplb_map"
    template = "lplb_map.cu.j2"

    num_experts: int       # logical experts E
    threads: int = 256
    profile: bool = False  # debug: count_grid's phase stamps into an extra last argument (benchmarks/lplb_run_profile.py)

    def validate(self) -> None:
        n = type(self).__name__
        check_int(n, "num_experts", self.num_experts, 1, MAX_EXPERTS)
        check_int(n, "threads", self.threads, 32, 1024, multiple_of=32)
        if self.threads // 32 * self.num_experts * 4 > SMEM_BUDGET:
            raise ValueError(f"{n}: threads={self.threads} with num_experts={self.num_experts} needs "
                             f"{self.threads // 32 * self.num_experts * 4} bytes of shared memory, over "
                             f"{SMEM_BUDGET}; use threads={map_threads(self.num_experts)}")
        if not isinstance(self.profile, bool):
            raise ValueError(f"{n}.profile={self.profile!r}: expected a bool")

    def template_vars(self):
        return dict(num_experts=self.num_experts, threads=self.threads, align=ALIGN, profile=self.profile)

    def name_fields(self) -> str:
        return f"e{self.num_experts}_t{self.threads}" + ("_prof" if self.profile else "")

    @classmethod
    @functools.lru_cache(maxsize=256)
    def for_experts(cls, num_experts: int) -> "MapSpec":
        """One spec object per E, so its validation runs once, not per call."""
        return cls(num_experts=num_experts, threads=map_threads(num_experts))


def chunk_bounds(n: int, n_sms: int) -> list[int]:
    """Chunk boundaries [b_0 = 0, ..., b_{n_sms} = n] shared with the kernels."""
    per = -(-n // n_sms)
    per = -(-per // ALIGN) * ALIGN
    return [min(n, per * b) for b in range(n_sms + 1)]


# ---- torch definitions (the CPU path and the kernels' oracles) ------------------------------
def count_reference(idx: torch.Tensor, num_experts: int, n_sms: int) -> torch.Tensor:
    """by_sm [n_sms, E] int32: inclusive prefix over chunks of the per-chunk counts."""
    flat = idx.reshape(-1)
    bounds = torch.tensor(chunk_bounds(flat.numel(), n_sms)[1:], device=flat.device)
    chunk = torch.bucketize(torch.arange(flat.numel(), device=flat.device), bounds, right=True)
    valid = flat >= 0
    key = chunk[valid] * num_experts + flat[valid]
    counts = torch.bincount(key, minlength=n_sms * num_experts).reshape(n_sms, num_experts)
    return counts.cumsum(0).to(torch.int32)


def occurrence_rank(flat: torch.Tensor) -> torch.Tensor:
    """k for every position: how many earlier positions hold the same value."""
    order = torch.sort(flat, stable=True).indices
    sorted_vals = flat[order]
    n = flat.numel()
    pos = torch.arange(n, device=flat.device)
    starts = torch.ones(n, dtype=torch.bool, device=flat.device)
    starts[1:] = sorted_vals[1:] != sorted_vals[:-1]
    group_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - group_start
    return rank


def map_reference(idx: torch.Tensor, probs: torch.Tensor, log2var: torch.Tensor, log2phy: torch.Tensor) -> torch.Tensor:
    flat = idx.reshape(-1)
    valid = flat >= 0
    e = flat.clamp_min(0)
    k = occurrence_rank(flat).to(torch.float64)
    var = log2var.long()[e]
    p = probs.reshape(-1).to(torch.float64)[var.clamp_min(0)].nan_to_num(0.0).clamp(0, 1)
    keep = (var < 0) | (torch.floor((k + 1) * p) > torch.floor(k * p))
    mapped = torch.where(keep, log2phy[e, 0], log2phy[e, 1]).long()
    return torch.where(valid, mapped, torch.full_like(mapped, -1)).reshape(idx.shape)


# ---- kernels ---------------------------------------------------------------------------------
_tickets: dict = {}
_partials: dict = {}
_launchers: dict = {}


TICKET_WORDS = 4  # the count's counters (templates/lplb_map.cu.j2), zero at first use
_count_states: dict = {}


def ticket(device: torch.device, stream_handle: int) -> SelfResettingZeros:
    """The count kernel's counters for this stream (the kernel keeps them usable between launches)."""
    key = (device.index, stream_handle)
    t = _tickets.get(key)
    if t is None:
        t = _tickets[key] = SelfResettingZeros(TICKET_WORDS, device)
    return t


def count_scratch(launch, device: torch.device, stream_handle: int, n_sms: int,
                  num_experts: int) -> tuple[SelfResettingZeros, int, int]:
    """(zeros to get() before a launch, partials pointer, ticket pointer) of the count launch `launch`
    on this stream. count_grid (launched cooperatively) takes its tagged rows [n_sms, E] uint64 and its
    epoch in one allocation, zeroed together (a row left from a launch before a re-zeroing would carry
    a tag the restarted epoch reuses); the last-block count takes int32 rows and the stream's ticket."""
    if launch.cooperative:
        key = (device.index, stream_handle, n_sms, num_experts)
        state = _count_states.get(key)
        if state is None:
            state = _count_states[key] = SelfResettingZeros(TICKET_WORDS + 2 * n_sms * num_experts, device)
        base = state.tensor.data_ptr()
        return state, base + 4 * TICKET_WORDS, base
    state = ticket(device, stream_handle)
    return state, count_partials(device, stream_handle, n_sms, num_experts).data_ptr(), state.tensor.data_ptr()


def count_partials(device: torch.device, stream_handle: int, n_sms: int, num_experts: int) -> torch.Tensor:
    """The count kernel's scratch rows [n_sms, E] for this stream (fully written before they are read)."""
    key = (device.index, stream_handle, n_sms, num_experts)
    t = _partials.get(key)
    if t is None:
        t = _partials[key] = torch.empty(n_sms * num_experts, dtype=torch.int32, device=device)
    return t


def launcher(spec: MapSpec, device: int, entry: str, n_sms: int):
    """The prepared launch (codegen.launch.Launcher) of `count` or `map` on n_sms blocks."""
    key = (spec, device, entry, n_sms)
    found = _launchers.get(key)
    if found is None:
        module = get_module(spec, device)
        if entry == "count":  # every block resident: they meet and share the scan (count_grid)
            smem = 4 * spec.num_experts
            grid = module.all_resident("count_grid", n_sms, spec.threads, smem)
            found = module.launcher("count_grid" if grid else "count", n_sms, spec.threads, "pqppppp", smem=smem,
                                    cooperative=grid)
        else:
            found = module.launcher("map", n_sms, spec.threads, "pqppppp",
                                    smem=spec.threads // 32 * spec.num_experts * 4)
        _launchers[key] = found
    return found


def count_site(device: int, num_experts: int, level: int) -> tuple[int, int]:
    """The error words of the count's id check (epkern.errors), (0, 0) with checks off."""
    if level < 1:
        return 0, 0
    spec = MapSpec.for_experts(num_experts)
    return errors.site(device, f"Planner: idx ({spec.symbol}_count) outside [-1, {num_experts})")


def count_cuda(idx: torch.Tensor, num_experts: int, n_sms: int, by_sm: torch.Tensor | None = None) -> torch.Tensor:
    spec = MapSpec.for_experts(num_experts)
    device = idx.device
    stream = current_stream_handle(device.index)  # raw handle: no torch Stream object per call
    if by_sm is None:
        by_sm = torch.empty(n_sms, num_experts, dtype=torch.int32, device=device)
    err, err_any = count_site(device.index, num_experts, errors.check_level())
    launch = launcher(spec, device.index, "count", n_sms)
    state, partials, ticket_ptr = count_scratch(launch, device, stream, n_sms, num_experts)
    state.get()
    launch(stream, idx.data_ptr(), idx.numel(), by_sm.data_ptr(), partials, ticket_ptr, err, err_any)
    return by_sm


def map_cuda(idx: torch.Tensor, probs: torch.Tensor, log2var: torch.Tensor, log2phy: torch.Tensor,
             by_sm: torch.Tensor, n_sms: int) -> torch.Tensor:
    num_experts = log2var.numel()
    spec = MapSpec.for_experts(num_experts)
    device = idx.device
    out = torch.empty_like(idx)
    launcher(spec, device.index, "map", n_sms)(
        current_stream_handle(device.index), idx.data_ptr(), idx.numel(), probs.data_ptr(), log2var.data_ptr(),
        log2phy.data_ptr(), by_sm.data_ptr(), out.data_ptr())
    return out


def deployment_specs(deployment) -> list[MapSpec]:
    return [MapSpec.for_experts(deployment.num_experts)]
