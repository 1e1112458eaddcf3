"""Planner: LPLB's per-batch load balancer, API-compatible with `lplb.Planner`.

Per batch: count tokens per logical expert (per-SM partial counts), all-reduce them over the
EP group, solve one LP per group of ranks, and rewrite every token's logical expert id into
the physical id of the original or of its replica in the solved proportion. CUDA tensors run
the JIT kernels (lplb_map, lplb_ipm); CPU tensors run torch and the numba solver.

Layout (LPLB's): rank r holds n_local = n_routed_experts / ep_size physical slots: first
`combined * dups` replicated originals (slot j*dups + d belongs to bundle d), then the fixed
experts, then `combined * dups` redundant copies (slot j*dups + d copies slot j*dups + d of
rank r2o[g, d] of the same group). Ranks form groups of r2o.shape[0] consecutive ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from epkern import errors
from epkern.call_plans import fresh_output
from epkern.codegen.launch import current_stream_handle
from epkern.validate import check_positive_int, check_range, check_tensor

from . import eplb, ipm_kernel, ipm_numba, lp, map_kernel, run_kernel
from .topologies import original_to_redundant, validate_r2o

# n_sms chunks of count_workload / weighted_select_target: one per SM (an H200 has 132); by_sm
# holds n_sms x n_logical counts, so a token count passed by mistake must not allocate gigabytes.
MAX_SMS = 1024


def _check_n_sms(n_sms) -> None:
    check_positive_int("n_sms", n_sms)
    if n_sms > MAX_SMS:
        raise ValueError(f"n_sms={n_sms}: at most {MAX_SMS} chunks (one per SM) are supported")


class Planner:
    def __init__(self, redundant_to_original: torch.Tensor, n_routed_experts: int, n_logical_routed_experts: int,
                 ep_size: int | None = None, group=None, *, device: torch.device | str | None = None) -> None:
        """
        Args:
            redundant_to_original: [group_size, dups] topology (see epkern.solver.topologies).
            n_routed_experts: physical routed experts in total, redundant copies included.
            n_logical_routed_experts: logical routed experts.
            ep_size: EP ranks; defaults to the size of `group` (one of the two is required).
            group: torch.distributed process group over which workloads are all-reduced; None: no reduction.
            device: where the planner's tables live and its kernels run; defaults, as in LPLB, to the
                current CUDA device when there is one (a topology on any device is moved there), else the CPU.
        """
        r2o = validate_r2o(redundant_to_original)
        if ep_size is None:
            if group is None:
                raise ValueError("ep_size must be given when group is None")
            import torch.distributed as dist

            ep_size = dist.get_world_size(group)
        check_positive_int("ep_size", ep_size)
        check_positive_int("n_routed_experts", n_routed_experts)
        check_positive_int("n_logical_routed_experts", n_logical_routed_experts)
        group_size, dups = r2o.shape
        if ep_size % group_size:
            raise ValueError(f"ep_size={ep_size} must be a multiple of the topology's group size {group_size}")
        for name, n in (("n_routed_experts", n_routed_experts), ("n_logical_routed_experts", n_logical_routed_experts)):
            if n % ep_size:
                raise ValueError(f"{name}={n} must be a multiple of ep_size={ep_size}")
        n_local, n_local_logical = n_routed_experts // ep_size, n_logical_routed_experts // ep_size
        extra = n_local - n_local_logical
        if extra <= 0 or extra % dups:
            raise ValueError(f"each rank needs a positive multiple of dups={dups} redundant slots; got "
                             f"{n_local} physical - {n_local_logical} logical = {extra} per rank")
        if extra > n_local_logical:
            raise ValueError(f"{extra} redundant slots per rank exceed the {n_local_logical} logical experts per rank")

        if device is None:  # LPLB moves the topology to the GPU; a CPU planner is asked for by device="cpu"
            device = redundant_to_original.device if redundant_to_original.is_cuda else \
                ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.r2o = r2o.to(self.device)
        self.o2r = original_to_redundant(r2o).to(self.device)
        self.group_size, self.num_redundants = group_size, dups
        self.n_routed_experts = n_routed_experts
        self.n_logical_routed_experts = n_logical_routed_experts
        self.ep_size = ep_size
        self.n_group = ep_size // group_size
        self.n_local_routed_experts = n_local
        self.n_local_logical_routed_experts = n_local_logical
        self.combined_redundant_experts = extra // dups
        self.ep_group = group
        self.deep_ep_initialized = False
        self._prev_probs = torch.full((self.n_group, group_size, dups), 0.5, dtype=torch.float32, device=self.device)
        self.last_status = self.last_iterations = self.last_objective = None
        self.phy2log: torch.Tensor
        self.update_redundancy_mapping()

    def init_from_deep_ep(self, buffer) -> None:
        """LPLB's: take the EP communication from a DeepEP Buffer (epkern's, or DeepEP's own). LPLB
        hands its solver the buffer's NVSHMEM; here the workload all-reduce of solve_probs then runs
        over the buffer's process group. Calling it again does nothing, as in LPLB."""
        if self.deep_ep_initialized:
            return
        import torch.distributed as dist

        group = buffer.group
        size = dist.get_world_size(group)
        if size != self.ep_size:
            raise ValueError(f"init_from_deep_ep: the buffer's group has {size} ranks, this planner was made for "
                             f"ep_size={self.ep_size}")
        self.ep_group = group
        self.deep_ep_initialized = True

    # -- placement -------------------------------------------------------------------------------
    def update_redundancy_mapping(self, workload: torch.Tensor | None = None, *, gpus_per_node: int | None = None):
        """Place experts (EPLB without redundancy, then each rank's experts sorted by historical
        load so the heaviest become the replicated originals) and the copies per the topology.

        Args:
            workload: [n_logical] historical loads, or None for the identity placement.
            gpus_per_node: for EPLB's node level; default: the visible CUDA devices (LPLB's choice), else 8.
        Returns:
            phy2log [n_routed] int32, log2phy [n_logical, 2] int32 (original first), logcnt [n_logical] int32.
        """
        n_log, G = self.n_logical_routed_experts, self.group_size
        D, C = self.num_redundants, self.combined_redundant_experts
        if workload is None:
            placed = torch.arange(n_log, device=self.device)
        else:
            check_tensor("workload", workload, dtype=(torch.int32, torch.int64, torch.float32, torch.float64),
                         contiguous=False)
            if workload.numel() != n_log:
                raise ValueError(f"workload: expected {n_log} entries (one per logical expert), got {workload.numel()}")
            eplb.check_loads("workload", workload.reshape(-1))
            if gpus_per_node is None:
                gpus_per_node = torch.cuda.device_count() if torch.cuda.is_available() else 8
            check_positive_int("gpus_per_node", gpus_per_node)
            history = workload.reshape(1, -1).to(self.device)
            placed = eplb.rebalance_experts(history, n_log, self.n_group, max(1, self.ep_size // gpus_per_node),
                                            self.ep_size)[0][0]
        placed = placed.reshape(self.n_group, G, self.n_local_logical_routed_experts)
        if workload is not None:  # heaviest first on every rank
            order = torch.sort(history[0][placed].double(), dim=-1, descending=True, stable=True).indices
            placed = placed.gather(-1, order)
        originals = placed[..., : C * D].reshape(self.n_group, G, C, D)
        copies = originals.gather(1, self.r2o.long().view(1, G, 1, D).expand_as(originals))
        self.phy2log = torch.cat([placed, copies.flatten(2)], dim=-1).flatten().to(torch.int32)
        self._build_tables(placed, originals)
        logcnt = (self._log2phy[:, 1] >= 0).to(torch.int32) + 1
        return self.phy2log, self._log2phy, logcnt

    def _build_tables(self, placed: torch.Tensor, originals: torch.Tensor) -> None:
        """log2phy [E, 2] (original, replica or -1) and log2var [E] (index into probs or -1)."""
        G, D, C = self.group_size, self.num_redundants, self.combined_redundant_experts
        n_local, n_local_logical = self.n_local_routed_experts, self.n_local_logical_routed_experts
        dev = self.device
        rank = (torch.arange(self.n_group, device=dev).view(-1, 1, 1) * G
                + torch.arange(G, device=dev).view(1, -1, 1)).expand_as(placed)
        log2phy = torch.full((self.n_logical_routed_experts, 2), -1, dtype=torch.int64, device=dev)
        log2phy[placed.flatten(), 0] = (rank * n_local + torch.arange(n_local_logical, device=dev)).flatten()
        # bundle (grp, g, j, d): its copy sits on rank grp*G + o2r[g, d], slot n_local_logical + j*D + d
        grp = torch.arange(self.n_group, device=dev).view(-1, 1, 1, 1)
        g = torch.arange(G, device=dev).view(1, -1, 1, 1)
        j = torch.arange(C, device=dev).view(1, 1, -1, 1)
        d = torch.arange(D, device=dev).view(1, 1, 1, -1)
        copy_rank = grp * G + self.o2r.long().view(1, G, 1, D)
        copy_slot = copy_rank * n_local + n_local_logical + j * D + d
        log2phy[originals.flatten(), 1] = copy_slot.expand_as(originals).flatten()
        log2var = torch.full((self.n_logical_routed_experts,), -1, dtype=torch.int64, device=dev)
        log2var[originals.flatten()] = ((grp * G + g) * D + d).expand_as(originals).flatten()
        self._log2phy = log2phy.to(torch.int32).contiguous()
        self._log2var = log2var.to(torch.int32).contiguous()

    # -- per batch ---------------------------------------------------------------------------------
    def _check_idx(self, idx: torch.Tensor) -> None:
        check_tensor("idx", idx, dtype=torch.int64)
        self._check_device("idx", idx)
        if not idx.is_cuda or errors.check_level() == 2:  # CUDA: the count kernel checks (epkern.errors)
            check_range("idx", idx, -1, self.n_logical_routed_experts)

    def _check_device(self, name: str, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise ValueError(f"{name}: on {t.device}, but this planner runs on {self.device} "
                             "(pass device= to Planner to choose)")

    def count_workload(self, idx: torch.Tensor, n_sms: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Count logical ids (-1 ignored) per SM chunk of idx (flattened).

        Returns (counts [n_logical] int32, by_sm [n_sms, n_logical] int32), by_sm being the inclusive
        prefix over the chunks (so counts is its last row), as weighted_select_target expects."""
        self._check_idx(idx)
        _check_n_sms(n_sms)
        if idx.is_cuda:
            by_sm = map_kernel.count_cuda(idx, self.n_logical_routed_experts, n_sms)
        else:
            by_sm = map_kernel.count_reference(idx, self.n_logical_routed_experts, n_sms)
        return by_sm[-1], by_sm

    def solve_probs(self, workload: torch.Tensor, avail_counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve every group's LP from per-logical-expert token counts.

        Args:
            workload: int32 (or int64) tensor with n_logical entries, each in [0, 2^31) (checked with
                EPKERN_CHECK_VALUES=1, one host sync on CUDA); all-reduced over `group` if one was given.
            avail_counter: int32 tensor with one element; incremented by the number of groups solved to
                optimality. A group that fails keeps its previous plan (0.5 at first).
        Returns:
            probs [n_group, group_size, dups] float32: the share of bundle (g, d) kept on rank g; rank
                h runs 1 - probs[r2o[h, d], d] of bundle d of rank r2o[h, d].
            global_workload [n_group, group_size, n_local_logical] float32: the workload / its max.
        Per-group details stay in last_status (0 optimal, 1 iteration limit, 2 numerical failure),
        last_iterations (both attempts' when a numerical failure was solved again with shorter steps)
        and last_objective (the busiest rank's planned load, tokens); on CUDA these
        are rewritten in place by the next solve on the same stream.
        """
        try:  # a signature seen before (CUDA, int32, no group): its checks passed, only pointers are new
            plan = self._fast_plans().get(("solve", workload.shape, workload.stride(), workload.dtype,
                                           workload.get_device(), avail_counter.shape, avail_counter.dtype,
                                           avail_counter.get_device()))
        except (AttributeError, TypeError):
            plan = None
        if plan is not None and plan.valid(self):
            return plan.solve(self, workload, avail_counter)
        check_tensor("workload", workload, dtype=(torch.int32, torch.int64), contiguous=False)
        if workload.numel() != self.n_logical_routed_experts:
            raise ValueError(f"workload: expected {self.n_logical_routed_experts} entries, got {workload.numel()}")
        self._check_solve_args(avail_counter)
        self._check_device("workload", workload)
        # token counts: >= 0 and within int32 (the solver's type); an int64 count beyond it would wrap
        check_range("workload", workload, 0, 1 << 31)
        original = workload
        if self.ep_group is not None:
            import torch.distributed as dist

            # reduced in int64 so that a sum beyond int32 is an error, not a wrapped count
            workload = workload.reshape(-1).to(torch.int64, copy=True)
            dist.all_reduce(workload, group=self.ep_group)
            check_range("workload (all-reduced over group)", workload, 0, 1 << 31)
        workload = workload.reshape(-1).to(torch.int32).contiguous()
        if workload.is_cuda:
            if self.ep_group is None and original.dim() == 1 and original.dtype == torch.int32 and original.is_contiguous():
                plan = _RunPlan(self, None, None, 0)
                self._fast_plans()[("solve", workload.shape, workload.stride(), workload.dtype, workload.get_device(),
                                    avail_counter.shape, avail_counter.dtype, avail_counter.get_device())] = plan
                return plan.solve(self, original, avail_counter)
            return self._solve_cuda(workload, avail_counter)
        return self._solve_cpu(workload, avail_counter)

    def _spec(self) -> ipm_kernel.IpmSpec:
        spec = self.__dict__.get("_ipm_spec")
        if spec is None:
            spec = self._ipm_spec = ipm_kernel.IpmSpec(self.group_size, self.num_redundants,
                                                       self.combined_redundant_experts)
        return spec

    def _fast_plans(self) -> dict:
        """Launch plans per call signature (see _RunPlan), made on first use."""
        plans = self.__dict__.get("_plans")
        if plans is None or len(plans) >= 256:
            plans = self._plans = {}
        return plans

    def _check_solve_args(self, avail_counter: torch.Tensor) -> None:
        check_tensor("avail_counter", avail_counter, dtype=torch.int32)
        if avail_counter.numel() != 1:
            raise ValueError(f"avail_counter: expected one element, got shape {tuple(avail_counter.shape)}")
        self._check_device("avail_counter", avail_counter)

    def _solve_cuda(self, workload, avail_counter):
        n_fixed = self.n_local_logical_routed_experts - self.combined_redundant_experts * self.num_redundants
        res = ipm_kernel.solve_cuda(self._spec(), workload, self.phy2log, self.r2o, self.o2r, self._prev_probs,
                                    avail_counter, self.n_group, n_fixed)
        self.last_status, self.last_iterations, self.last_objective = res.status, res.iterations, res.objective
        return res.probs, res.global_workload

    def _solve_cpu(self, workload, avail_counter):
        w, f = lp.bundle_loads(workload, self.phy2log, self.n_group, self.group_size, self.num_redundants,
                               self.combined_redundant_experts)
        probs, status, iters, objective = ipm_numba.solve_groups(
            w.numpy(), f.numpy(), self.r2o.numpy(), self.o2r.numpy(), self._prev_probs.double().numpy(),
            ipm_numba.MAX_ITERATIONS, ipm_numba.TOLERANCE)
        probs = torch.from_numpy(probs).to(torch.float32)
        ok = torch.from_numpy(status == ipm_numba.STATUS_OPTIMAL)
        self._prev_probs[ok] = probs[ok]
        avail_counter += int(ok.sum())
        self.last_status = torch.from_numpy(status)
        self.last_iterations = torch.from_numpy(iters)
        self.last_objective = torch.from_numpy(objective).to(torch.float32)
        wmax = int(workload.max()) if workload.numel() else 0
        global_workload = workload.to(torch.float32) / wmax if wmax > 0 else torch.zeros(workload.shape)
        return probs, global_workload.reshape(self.n_group, self.group_size, -1)

    def weighted_select_target(self, idx: torch.Tensor, o_weight: torch.Tensor, local_workload_by_sm: torch.Tensor,
                               n_sms: int) -> torch.Tensor:
        """Rewrite logical ids into physical ids: each replicated expert's occurrences go to its original
        with share o_weight (probs of solve_probs) and to its replica otherwise, every SM chunk within one
        token per expert; fixed experts go to their only copy; -1 stays -1. Deterministic.

        local_workload_by_sm: the by_sm of count_workload(idx, n_sms). Returns int64, idx's shape."""
        self._check_idx(idx)
        _check_n_sms(n_sms)
        shape = (self.n_group, self.group_size, self.num_redundants)
        check_tensor("o_weight", o_weight, dtype=torch.float32, ndim=3, shape=shape)
        check_tensor("local_workload_by_sm", local_workload_by_sm, dtype=torch.int32, ndim=2,
                     shape=(n_sms, self.n_logical_routed_experts))
        for name, t in (("o_weight", o_weight), ("local_workload_by_sm", local_workload_by_sm)):
            self._check_device(name, t)
        if idx.is_cuda:
            return map_kernel.map_cuda(idx, o_weight, self._log2var, self._log2phy, local_workload_by_sm, n_sms)
        return map_kernel.map_reference(idx, o_weight, self._log2var, self._log2phy)

    def run(self, idx: torch.Tensor, avail_counter: torch.Tensor, n_sms: int | None = None) -> torch.Tensor:
        """count_workload -> solve_probs -> weighted_select_target. n_sms defaults to the GPU's SM count (1 on CPU).

        On CUDA without a group, a call signature seen before launches the three kernels from a plan
        (_RunPlan): the counts and the plan stay in buffers of the planner (per stream), only the
        mapped ids are a fresh tensor."""
        try:  # a signature seen before: its checks passed, only the pointers and the stream are new
            key = ("run", idx.shape, idx.stride(), idx.dtype, idx.get_device(), avail_counter.shape, avail_counter.dtype,
                   avail_counter.get_device(), n_sms, type(n_sms), errors.check_level())
            plan = self._fast_plans().get(key)
        except (AttributeError, TypeError):
            key = plan = None
        if plan is not None and plan.valid(self):
            errors.raise_pending()
            return plan.run(self, idx, avail_counter)
        if (key is not None and self.ep_group is None and isinstance(idx, torch.Tensor) and idx.is_cuda
                and key[-1] != 2 and (n_sms is None or type(n_sms) is int)):
            self._check_idx(idx)
            if n_sms is not None:
                check_positive_int("n_sms", n_sms)
            self._check_solve_args(avail_counter)
            errors.raise_pending()
            plan = _RunPlan(self, idx, avail_counter, n_sms if n_sms is not None else _sm_count(idx.device), key[-1])
            self._fast_plans()[key] = plan
            return plan.run(self, idx, avail_counter)
        if n_sms is None:
            n_sms = (torch.cuda.get_device_properties(idx.device).multi_processor_count if idx.is_cuda else 1)
        local_workload, by_sm = self.count_workload(idx, n_sms)
        probs, _ = self.solve_probs(local_workload, avail_counter)
        return self.weighted_select_target(idx, probs, by_sm, n_sms)

    # -- diagnostics ---------------------------------------------------------------------------------
    def rank_loads(self, workload: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens per rank [ep_size] (float64) for per-logical-expert counts, split by probs
        (None: nothing moved to the copies, i.e. the load before balancing)."""
        workload = workload.reshape(-1).to(self.device)
        w, f = lp.bundle_loads(workload, self.phy2log, self.n_group, self.group_size, self.num_redundants,
                               self.combined_redundant_experts)
        if probs is None:
            probs = torch.ones_like(w)
        return lp.rank_loads(w, f, probs.to(w.device), self.r2o).reshape(-1)


_sm_counts: dict = {}


def _sm_count(device: torch.device) -> int:
    n = _sm_counts.get(device.index)
    if n is None:
        n = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


class _RunBuffers:
    """One stream's persistent buffers of a plan: the counts, the count's scratch and ticket, and the
    solve's outputs that run() does not return (every call rewrites them, in stream order)."""

    def __init__(self, plan: "_RunPlan", stream: int):
        dev, E = plan.device, plan.n_logical
        if plan.n_sms:
            self.by_sm = torch.empty(plan.n_sms, E, dtype=torch.int32, device=dev)
            self.by_sm_ptr = self.by_sm.data_ptr()
            self.workload_ptr = self.by_sm_ptr + 4 * (plan.n_sms - 1) * E  # the last row: the totals
            self.partials_ptr = map_kernel.count_partials(dev, stream, plan.n_sms, E).data_ptr()  # the fused run's
            self.count_state, self.count_partials_ptr, self.ticket_ptr = map_kernel.count_scratch(
                plan.count_launch, dev, stream, plan.n_sms, E)
            # the fused run's state (solver/run_kernel.py state_words), kept usable by the kernel
            self.run_zeros = map_kernel.SelfResettingZeros(run_kernel.state_words(E), dev)
            self.totals_ptr = self.run_zeros.tensor.data_ptr()
            self.sync_ptr = self.totals_ptr + 4 * run_kernel.sync_offset(E)
            self.probs = torch.empty(plan.n_group, plan.group_size, plan.dups, dtype=torch.float32, device=dev)
            self.probs_ptr = self.probs.data_ptr()
            self.gw = torch.empty(E, dtype=torch.float32, device=dev)
            self.gw_ptr = self.gw.data_ptr()
        self.stats = torch.empty(plan.n_group, 2, dtype=torch.int32, device=dev)
        self.objective = torch.empty(plan.n_group, dtype=torch.float32, device=dev)
        self.status, self.iterations = self.stats[:, 0], self.stats[:, 1]
        self.stats_ptr, self.objective_ptr = self.stats.data_ptr(), self.objective.data_ptr()
        # the next call's fresh outputs, allocated just after this call's launch (off the path to the GPU)
        self.spare_out = None
        self.spare_solve = None


class _RunPlan:
    """The launches of Planner.run (count, solve, map) or of solve_probs alone for one call signature,
    made after the checks passed once. Every call returns fresh outputs; they are allocated during the
    call before (on the same stream, after its launch), so an eager call's kernel starts sooner. It holds the planner's tables it was made with and is used only
    while they are still the planner's (update_redundancy_mapping makes new ones)."""

    def __init__(self, planner: Planner, idx: torch.Tensor | None, avail_counter, n_sms: int, level: int = 1):
        self.device = planner.device
        self.n_logical = planner.n_logical_routed_experts
        self.n_group, self.group_size, self.dups = planner.n_group, planner.group_size, planner.num_redundants
        self.n_fixed = planner.n_local_logical_routed_experts - planner.combined_redundant_experts * planner.num_redundants
        self.n_local_logical = planner.n_local_logical_routed_experts
        self.new_probs = fresh_output((self.n_group, self.group_size, self.dups), torch.float32, self.device)
        self.new_global_workload = fresh_output((self.n_group, self.group_size, self.n_local_logical), torch.float32,
                                                self.device)
        self.state = (planner.phy2log, planner._log2var, planner._log2phy, planner.r2o, planner.o2r, planner._prev_probs)
        self.phy2log_ptr, self.log2var_ptr, self.log2phy_ptr, self.r2o_ptr, self.o2r_ptr, self.prev_ptr = (
            t.data_ptr() for t in self.state)
        dev = self.device.index
        self.solve_launch = ipm_kernel.launcher(planner._spec(), dev, self.n_group)
        self.n_sms = n_sms
        self.fused_launch = None
        if idx is not None:
            self.numel = idx.numel()
            self.new_out = fresh_output(idx.shape, torch.int64, self.device)
            spec = map_kernel.MapSpec.for_experts(self.n_logical)
            self.count_launch = map_kernel.launcher(spec, dev, "count", n_sms)
            self.map_launch = map_kernel.launcher(spec, dev, "map", n_sms)
            self.err, self.err_any = map_kernel.count_site(dev, self.n_logical, level)
            self.fused_launch = _fused_launcher(planner, dev, n_sms)
            if self.fused_launch is not None and level >= 1:
                self.err, self.err_any = errors.site(
                    dev, f"Planner.run: idx ({self.fused_launch.name}) outside [-1, {self.n_logical})")
        self.buffers: dict = {}

    def valid(self, planner: Planner) -> bool:
        s = self.state
        return (planner.phy2log is s[0] and planner._log2var is s[1] and planner._log2phy is s[2]
                and planner.r2o is s[3] and planner.o2r is s[4] and planner._prev_probs is s[5])

    def _buffers(self, stream: int) -> _RunBuffers:
        b = self.buffers.get(stream)
        if b is None:
            b = self.buffers[stream] = _RunBuffers(self, stream)
        return b

    def run(self, planner: Planner, idx: torch.Tensor, avail_counter: torch.Tensor) -> torch.Tensor:
        stream = _raw_stream(self.device.index)
        b = self.buffers.get(stream) or self._buffers(stream)
        out = b.spare_out
        if out is None:
            out = self.new_out()
        idx_ptr = idx.data_ptr()
        if self.fused_launch is not None:  # one cooperative kernel (solver/run_kernel.py)
            zeros = b.run_zeros
            if not zeros.trusted:
                zeros.get()
            self.fused_launch(stream, idx_ptr, self.numel, b.partials_ptr, b.totals_ptr, b.sync_ptr, self.phy2log_ptr,
                              self.n_fixed, self.r2o_ptr, self.o2r_ptr, self.prev_ptr, b.probs_ptr, b.gw_ptr,
                              avail_counter.data_ptr(), b.stats_ptr, b.objective_ptr, self.n_group, self.log2var_ptr,
                              self.log2phy_ptr, out.data_ptr(), self.err, self.err_any)
            planner.last_status, planner.last_iterations, planner.last_objective = b.status, b.iterations, b.objective
            b.spare_out = self.new_out()
            return out
        if not b.count_state.trusted:
            b.count_state.get()
        self.count_launch(stream, idx_ptr, self.numel, b.by_sm_ptr, b.count_partials_ptr, b.ticket_ptr, self.err,
                          self.err_any)
        self.solve_launch(stream, b.workload_ptr, self.n_logical, self.phy2log_ptr, self.n_fixed, self.r2o_ptr,
                          self.o2r_ptr, self.prev_ptr, b.probs_ptr, b.gw_ptr, avail_counter.data_ptr(), b.stats_ptr,
                          b.objective_ptr)
        self.map_launch(stream, idx_ptr, self.numel, b.probs_ptr, self.log2var_ptr, self.log2phy_ptr, b.by_sm_ptr,
                        out.data_ptr())
        planner.last_status, planner.last_iterations, planner.last_objective = b.status, b.iterations, b.objective
        b.spare_out = self.new_out()
        return out

    def solve(self, planner: Planner, workload: torch.Tensor, avail_counter: torch.Tensor):
        stream = _raw_stream(self.device.index)
        b = self.buffers.get(stream) or self._buffers(stream)
        probs, global_workload = b.spare_solve or self._solve_outputs()
        self.solve_launch(stream, workload.data_ptr(), self.n_logical, self.phy2log_ptr, self.n_fixed, self.r2o_ptr,
                          self.o2r_ptr, self.prev_ptr, probs.data_ptr(), global_workload.data_ptr(),
                          avail_counter.data_ptr(), b.stats_ptr, b.objective_ptr)
        planner.last_status, planner.last_iterations, planner.last_objective = b.status, b.iterations, b.objective
        b.spare_solve = self._solve_outputs()
        return probs, global_workload

    def _solve_outputs(self):
        return self.new_probs(), self.new_global_workload()


def _fused_launcher(planner: Planner, device: int, n_sms: int):
    """The one-kernel run (solver/run_kernel.py) where it applies: on (EPKERN_LPLB_FUSED, default 1), every
    block resident at once, the kernel available (EPKERN_JIT=0 without it in the cache: the three kernels)."""
    from epkern.codegen import MissingKernelError, knobs

    if not knobs.lplb_fused():
        return None
    spec = run_kernel.run_spec(planner.group_size, planner.num_redundants, planner.combined_redundant_experts,
                               planner.n_logical_routed_experts)
    try:
        if not run_kernel.fits(spec, device, n_sms, planner.n_group):
            return None
        return run_kernel.launcher(spec, device, n_sms)
    except (MissingKernelError, ValueError):
        return None


_raw_stream = current_stream_handle
