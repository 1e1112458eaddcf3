"""Low-latency dispatch / combine for decoding, over NVLink peer memory, with DeepEP's API.

`LowLatencyBuffer(group, num_bytes)` maps one peer buffer per rank into every rank. Every
NVLink transfer is one per (token, rank), not one per (token, expert): dispatch writes each token
once (FP8-cast on the fly) into slot [source rank][token] of every rank holding one of its
experts, then publishes per-expert counts and a flag with release stores (flags carry the epoch of
their use, so nobody clears them); the receive kernel
waits on the flags (with a deadline) and fans each token out to its local experts' rows of
recv_x, first by source rank, then by token order at the source. Combine reduces on the expert
side: each rank sums a token's rows on its experts with the top-k weights (which every rank copies
to the others when combine starts) and sends one partial row back; the source rank adds the
partial rows (fp32) and rounds once more to bf16.

Two buffers alternate (dispatch and combine each flip), so at most two results may be alive.
No host synchronization on any path; the token count and M are run-time kernel arguments, so
CUDA-graph capture works and changing them compiles nothing. SMs used: dispatch send and combine
receive min(T, num_sms), dispatch receive and combine send num_sms blocks of 512 threads, one
block per SM (num_sms defaults to 132, at most the GPU's SM count). Without a hook, send and
receive run as one launch of num_sms blocks (its blocks spin on flags, so the grid must fit the
GPU at once). The combine send kernel waits for every rank's weights: it returns once every rank
has started its combine (the ranks run the same schedule), unless dispatch carried the weights
(low_latency_dispatch(..., topk_weights=...), an extension of DeepEP's API): then it waits for no
rank. Combine rows land in their own region of the buffer, apart from the dispatch messages, so a
rank may run ahead of a peer that has not read its dispatch messages yet.

Buffer reuse rule (as DeepEP's): every rank issues the same sequence of calls, and each call's
inputs depend on the previous call's results of its micro-batch (a dispatch's hook before the
combine of its expert outputs, a combine's hook before the next dispatch); with two micro-batches,
interleave their calls (a, b, a, b) so each keeps to one of the two buffers.

`make_low_latency_buffer` is what epkern.Buffer calls: this NVLink buffer where it applies (CUDA,
one node, peer access between every pair of GPUs), else epkern.internode.low_latency's engine over
torch.distributed collectives (across nodes, without peer access, CPU under gloo), with the same
methods and results. `LowLatencyChecks` holds what both share: the argument checks and the mask.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from epkern import errors
from epkern.codegen import knobs

from .handle import as_handle
from .kernels import BufferLayout, dispatch_kind, launch_barrier, max_tokens_for_bytes, size_hint
from .plans import CombinePlan, DispatchPlan, OutputRing
from ..call_plans import signature, store
from ..peer_memory import PeerBuffer
from ..validate import check_cuda, check_positive_int, check_range, check_tensor

DEFAULT_NUM_SMS = 132  # one wave on H100/H200: latency over SM thrift (pass num_sms= to use fewer)


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                   num_experts: int) -> int:
    """Bytes of peer buffer per rank for low-latency mode (DeepEP's name; it sizes our NVLink buffer).

    = 256 + 2 x (24R + 4E + 128*R*M + R*M*(384 + 2H) + R*M*(meta + 2H) + E*M*2H), each term rounded
    up to 128 bytes: flags, counts, top-k weights, one dispatch slot per (rank, token) (the largest
    message: top-32 header with weights, bf16 row), one combine slot per (rank, token) (meta =
    16 x ceil(4 x floor(H / 128) / 16) bytes of LogFMT group statistics, bf16 row), the zero-copy
    combine rows.
    """
    return size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)


def max_dispatch_tokens_for_bytes(num_bytes: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """The inverse of the size hint: the largest M per rank that num_bytes holds (0 if none)."""
    return max_tokens_for_bytes(num_bytes, hidden, num_ranks, num_experts)


def make_low_latency_buffer(group, num_bytes: int, timeout_s: float | None = None, num_sms: int | None = None,
                            topology=None):
    """The low-latency engine for `group` (a collective: every rank calls it).

    LowLatencyBuffer (the NVLink kernels) when CUDA is present, the group's ranks are on one node
    (`topology`, an epkern.internode.NodeTopology; detected when None) and every GPU maps every
    other's memory, whatever the group's backend; otherwise epkern.internode.low_latency's
    CollectiveLowLatency (all_to_all_single: ranks on several nodes, GPUs without peer access,
    CPU tensors over gloo), which has the same methods and results."""
    from ..internode.topology import NodeTopology, detect_topology
    from ..peer_memory import peer_access_everywhere

    if topology is None:
        topology = detect_topology(group) if dist.get_world_size(group) > 1 else NodeTopology(1, 1)
    if (topology.num_nodes == 1 and torch.cuda.is_available()
            and peer_access_everywhere(group, torch.cuda.current_device())):
        return LowLatencyBuffer(group, num_bytes, timeout_s, **({} if num_sms is None else {"num_sms": num_sms}))
    from ..internode.low_latency import CollectiveLowLatency

    return CollectiveLowLatency(group, num_bytes, timeout_s, num_sms=num_sms)


_PLAN_LIMIT = 256  # signatures kept per direction (a new token count is a new signature)
_RING_LIMIT = 16   # output signatures whose two output sets a buffer keeps (plans.OutputRing)


def _store(plans: dict, key, plan) -> None:
    store(plans, key, plan, _PLAN_LIMIT)


class LowLatencyChecks:
    """What both low-latency engines share (this module's NVLink LowLatencyBuffer and
    epkern.internode.low_latency's collective one): DeepEP's argument checks, made before anything
    is sent, and the rank mask. Subclasses set rank, num_ranks, device and mask ([R] int32)."""

    rank: int
    num_ranks: int
    device: torch.device
    mask: torch.Tensor
    device_checks_ids = False  # True: the kernels drop and count bad top-k ids (epkern.errors), no host check at level 1

    def _check_experts(self, num_experts: int) -> None:
        check_positive_int("num_experts", num_experts)
        if num_experts % self.num_ranks:
            raise ValueError(f"num_experts={num_experts} must be divisible by the number of ranks {self.num_ranks}")

    def _check_topk(self, topk_idx, num_tokens: int | None, num_experts: int, max_tokens: int) -> None:
        check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2, device=self.device)
        if num_tokens is not None and topk_idx.shape[0] != num_tokens:
            raise ValueError(f"topk_idx: {topk_idx.shape[0]} rows, expected one per token ({num_tokens})")
        if topk_idx.shape[0] > max_tokens:
            raise ValueError(f"{topk_idx.shape[0]} tokens exceed num_max_dispatch_tokens_per_rank={max_tokens}")
        if not self.device_checks_ids or errors.check_level() == 2:
            check_range("topk_idx", topk_idx, -1, num_experts)

    def _check_stats(self, name: str, t, length: int, dtype) -> None:
        if t is not None:
            check_tensor(name, t, dtype=dtype, shape=(length,), ndim=1, device=self.device)

    def _check_dispatch_args(self, x, topk_idx, M: int, num_experts: int, cumulative_local_expert_recv_stats,
                             dispatch_wait_recv_cost_stats, use_fp8: bool, async_finish: bool, return_recv_hook: bool,
                             topk_weights) -> None:
        """low_latency_dispatch's inputs, in DeepEP's terms (see LowLatencyBuffer.low_latency_dispatch)."""
        check_positive_int("num_max_dispatch_tokens_per_rank", M)
        self._check_experts(num_experts)
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2, device=self.device)
        if x.data_ptr() % 16:
            raise ValueError("x: the data must start 16-byte aligned (the kernels read whole 16-byte words)")
        num_tokens, hidden = x.shape
        if use_fp8 and hidden % 128:
            raise ValueError(f"x: hidden={hidden} must be a multiple of 128 with use_fp8=True (128-channel scale groups)")
        if hidden % 8 or hidden == 0:
            raise ValueError(f"x: hidden={hidden} must be a multiple of 8 (rows a multiple of 16 bytes)")
        self._check_topk(topk_idx, num_tokens, num_experts, M)
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_idx.shape), ndim=2,
                         device=self.device)
        L, R = num_experts // self.num_ranks, self.num_ranks
        self._check_stats("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, L, torch.int32)
        self._check_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, R, torch.int64)
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set")

    def _check_combine_args(self, x, topk_idx, topk_weights, handle, zero_copy: bool, async_finish: bool,
                            return_recv_hook: bool, out, combine_wait_recv_cost_stats):
        """low_latency_combine's inputs -> the handle's fields (see LowLatencyBuffer.low_latency_combine)."""
        fields = self._check_handle(handle)
        src_info, layout_range, M, hidden, num_experts, token_rows, recv_tokens, token_weights = fields
        L, R = num_experts // self.num_ranks, self.num_ranks
        if not zero_copy:
            check_tensor("x", x, dtype=torch.bfloat16, shape=(L, R * M, hidden), ndim=3, device=self.device)
        self._check_topk(topk_idx, None, num_experts, M)
        num_tokens, num_topk = topk_idx.shape
        if token_rows.shape[2] != num_topk:
            raise ValueError(f"topk_idx: {num_topk} columns, the dispatch that made the handle had {token_rows.shape[2]}")
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(num_tokens, num_topk), ndim=2,
                         device=self.device)
        elif token_weights is None:
            raise ValueError("topk_weights: None needs a handle whose dispatch carried the weights "
                             "(low_latency_dispatch(..., topk_weights=...))")
        if out is not None:
            check_tensor("out", out, dtype=torch.bfloat16, shape=(num_tokens, hidden), ndim=2, device=self.device)
        self._check_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, R, torch.int64)
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set")
        return fields

    def _check_handle(self, handle):
        handle = as_handle(handle)
        src_info, layout_range, M, hidden, num_experts = handle
        token_rows, recv_tokens, token_weights = handle.token_rows, handle.recv_tokens, handle.token_weights
        check_positive_int("handle M", M)
        self._check_experts(num_experts)
        L, R = num_experts // self.num_ranks, self.num_ranks
        check_tensor("handle src_info", src_info, dtype=torch.int32, shape=(L, R * M), ndim=2, device=self.device)
        check_tensor("handle layout_range", layout_range, dtype=torch.int64, shape=(L, R), ndim=2, device=self.device)
        check_tensor("handle token_rows", token_rows, dtype=torch.int32, ndim=3, device=self.device)
        if token_rows.shape[:2] != (R, M):
            raise ValueError(f"handle token_rows: shape {tuple(token_rows.shape)}, expected ({R}, {M}, K)")
        check_tensor("handle recv_tokens", recv_tokens, dtype=torch.int32, shape=(R,), ndim=1, device=self.device)
        if token_weights is not None:
            check_tensor("handle token_weights", token_weights, dtype=torch.float32, shape=tuple(token_rows.shape),
                         ndim=3, device=self.device)
        return src_info, layout_range, M, hidden, num_experts, token_rows, recv_tokens, token_weights

    # -- the rank mask -------------------------------------------------------------------------------
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (mask=True) or unmask a rank: a masked rank is neither sent to nor waited for."""
        if isinstance(rank_to_mask, bool) or not isinstance(rank_to_mask, int) or not 0 <= rank_to_mask < self.num_ranks:
            raise ValueError(f"rank_to_mask={rank_to_mask!r}: expected an int in [0, {self.num_ranks})")
        self.mask[rank_to_mask].fill_(1 if mask else 0)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy the mask into mask_status ([R] int32; 1 = masked, by the user or after a timeout)."""
        check_tensor("mask_status", mask_status, dtype=torch.int32, shape=(self.num_ranks,), ndim=1)
        if self.device.type == "cuda":
            check_cuda("mask_status", mask_status)
        mask_status.copy_(self.mask)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank."""
        self.mask.zero_()


class LowLatencyBuffer(LowLatencyChecks):
    """The low-latency half of epkern.Buffer: DeepEP's low_latency_* methods over one peer buffer.
    Calls of a signature seen before skip the checks and launch from a plan (epkern.low_latency.plans)."""

    device_checks_ids = True  # dispatch drops and counts bad top-k ids on the device (epkern.errors)

    def __init__(self, group, num_bytes: int, timeout_s: float | None = None, num_sms: int = DEFAULT_NUM_SMS):
        check_positive_int("num_bytes", num_bytes)
        check_positive_int("num_sms", num_sms)
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_bytes = int(num_bytes)
        self.num_sms = num_sms
        timeout = knobs.peer_timeout_s() if timeout_s is None else knobs.check_timeout_s("timeout_s", timeout_s)
        self.timeout_ns = np.uint64(int(timeout * 1e9))
        self.peer = PeerBuffer(group, self.num_bytes)
        self.device = self.peer.device
        # one block per SM at most: the one-launch kernels spin on flags, so their grid must be resident
        self.num_sms = min(num_sms, torch.cuda.get_device_properties(self.device).multi_processor_count)
        self.mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        # per buffer [dispatch, combine]: the send kernels' last-block tickets, and the epoch of the
        # last use, which every flag of the next use carries (counted alike on every rank)
        self.tickets = torch.zeros(4, dtype=torch.int32, device=self.device)
        self.epochs = torch.zeros(4, dtype=torch.int32, device=self.device)
        self.barrier_epoch = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.buffer_idx = 0
        self._dispatch_plans: dict = {}   # call signature -> plans.DispatchPlan (its checks passed once)
        self._combine_plans: dict = {}
        self._rings: dict = {}            # output signature -> plans.OutputRing (DeepEP's two live results)

    @property
    def ptr_table(self) -> torch.Tensor:
        return self.peer.ptr_table

    @property
    def local_base(self) -> int:
        return self.peer.local_ptr

    # -- helpers -------------------------------------------------------------------------------------
    def _layout(self, max_tokens: int, hidden: int, num_experts: int) -> BufferLayout:
        layout = BufferLayout(max_tokens, hidden, self.num_ranks, num_experts)
        if layout.total_bytes > self.num_bytes:
            raise ValueError(
                f"low-latency buffer too small: M={max_tokens}, hidden={hidden}, experts={num_experts} need "
                f"{layout.total_bytes} bytes, the buffer has {self.num_bytes}; allocate "
                f"get_low_latency_rdma_size_hint(...) bytes, or use M <= "
                f"{max_tokens_for_bytes(self.num_bytes, hidden, self.num_ranks, num_experts)}")
        return layout

    def _output_ring(self, key) -> OutputRing:
        """The output sets of one output signature, shared by every plan that returns them; the oldest
        signature's sets are dropped past _RING_LIMIT (results still held stay valid: they are the caller's)."""
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) >= _RING_LIMIT:
                del self._rings[next(iter(self._rings))]
            ring = self._rings[key] = OutputRing()
        return ring

    def _next_buffer(self) -> int:
        idx = self.buffer_idx
        self.buffer_idx ^= 1
        return idx

    # -- dispatch ------------------------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False, topk_weights: torch.Tensor | None = None):
        """Send each token to the ranks of its top-k experts; returns (recv_x, recv_count, handle, event, hook).

        x: bf16 [T, H]; H a multiple of 8 (rows a multiple of 16 bytes), of 128 with use_fp8.
        recv_x: bf16 [L, R*M, H], or (fp8 [L, R*M, H], scales) with fp32 scales [L, R*M, H/128] or, with
        use_ue8m0, int32 [L, R*M, ceil(H/512)] (4 UE8M0 bytes each); the scales' last two dimensions are
        column-major. Only the first recv_count[l] rows of expert l are valid, ordered by source rank,
        then by token index at the source. handle: a LowLatencyHandle, DeepEP's five fields
        (src_info [L, R*M] int32, layout_range [L, R] int64 = (begin << 32) | count, M, H, E) as a
        tuple, carrying token_rows [R, M, K] int32 (where each received token's copies went),
        recv_tokens [R] int32 and token_weights as attributes (for combine).
        dispatch_wait_recv_cost_stats ([R] int64) accumulates the nanoseconds spent waiting for each
        source rank. As DeepEP documents, hold at most two results of these calls at once: the outputs
        and the handle come from two sets per output shape, used in turn (epkern/low_latency/plans.py),
        so the third dispatch of a shape writes into the first one's tensors.

        topk_weights (an epkern extension, after DeepEP's parameters): fp32 [T, K], the weights the
        combine of this handle will apply. They travel with the tokens (K fp32 more in each message's
        header, padded to 16 bytes: 32 bytes at top-8, +0.43% of an FP8 message at hidden 7168) and stay
        in the handle (token_weights [R, M, K]), so combine's send half waits for no other rank and
        the result is the same bit for bit. Every rank must pass them alike (as every other option).
        """
        M = num_max_dispatch_tokens_per_rank
        try:  # a signature seen before: its checks passed, only the pointers are new
            key = (x.shape, x.stride(), x.dtype, x.get_device(), topk_idx.shape, topk_idx.stride(), topk_idx.dtype,
                   topk_idx.get_device(), M, type(M), num_experts, type(num_experts),
                   signature(cumulative_local_expert_recv_stats), signature(dispatch_wait_recv_cost_stats),
                   signature(topk_weights), use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook,
                   errors.check_level(), self.num_sms)
            plan = self._dispatch_plans.get(key)
        except (AttributeError, TypeError):  # not a tensor, an unhashable argument: the checks say what
            key = plan = None
        if plan is None or x.data_ptr() % 16:
            self._check_dispatch_args(x, topk_idx, M, num_experts, cumulative_local_expert_recv_stats,
                                      dispatch_wait_recv_cost_stats, use_fp8, async_finish, return_recv_hook,
                                      topk_weights)
            plan = DispatchPlan(self, x, topk_idx, M, num_experts, dispatch_kind(use_fp8, round_scale, use_ue8m0),
                                topk_weights is not None, return_recv_hook, async_finish, errors.check_level())
            if key is not None:
                _store(self._dispatch_plans, key, plan)
        errors.raise_pending()
        return plan(self, x, topk_idx, topk_weights, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats)

    # -- combine -------------------------------------------------------------------------------------
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None,
                            handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None):
        """Reduce the expert rows back to their tokens: combined_x[t] = sum_k w[t,k] * row(t, k).

        Each rank sums a token's rows on its own experts (fp32, rounded to bf16) and sends that one
        partial row back; the token's rank adds the partial rows in fp32 and rounds to bf16 (two
        roundings, as in normal-mode combine). x: bf16 [L, R*M, H] (ignored with zero_copy: the rows
        were written into get_next_low_latency_combine_buffer(handle)). topk_idx and topk_weights
        must be those of the dispatch that made the handle. Returns (combined_x [T, H] bf16, event, hook);
        without out=, combined_x comes from two tensors per [T, H] used in turn (hold at most two
        results, as DeepEP documents).
        handle: the LowLatencyHandle low_latency_dispatch returned (a rebuilt tuple is refused).

        Without weights carried by dispatch, the send half waits until every rank has started its
        combine (it needs their top-k weights). With a handle from low_latency_dispatch(...,
        topk_weights=w), combine applies w, its send half waits for no rank, and topk_weights may be
        None (if given, it must equal w: it is checked for shape only).

        use_logfmt: the partial rows travel as LogFMT-10 (DeepEP's format: per 128 channels, a sign
        and a 9-bit code on a log2 grid from the group's amin, clipped at 2^-32 amax, to its amax;
        groups with amax >= 1 and the hidden % 128 tail channels stay bf16; 160 bytes per encoded
        group instead of 256, plus 4 bytes of group statistics). Error per value of an encoded
        partial row: |decoded - x| <= (eps + 2^-14) * |x| + 2^-32 * amax(group), eps = (2^s - 1) / (2^s + 1)
        for the group's step s = log2(amax / amin) / 510, at most 0.0218 (0.0054 for a range of 2^8);
        the receiver then adds the partial rows in fp32 and rounds to bf16 as without it.
        epkern.low_latency.logfmt is the CPU reference.
        """
        try:  # a signature seen before: its checks passed, only the pointers are new
            key = (None if zero_copy else signature(x), signature(topk_idx), signature(topk_weights), type(handle),
                   handle[2:], signature(handle[0]), signature(handle.token_rows), handle.carries_weights, use_logfmt,
                   zero_copy, async_finish, return_recv_hook, signature(out), signature(combine_wait_recv_cost_stats),
                   errors.check_level(), self.num_sms)
            plan = self._combine_plans.get(key)
        except (AttributeError, TypeError, IndexError):
            key = plan = None
        if plan is None:
            self._check_combine_args(x, topk_idx, topk_weights, handle, zero_copy, async_finish, return_recv_hook, out,
                                     combine_wait_recv_cost_stats)
            plan = CombinePlan(self, topk_idx, handle, use_logfmt, zero_copy, return_recv_hook, async_finish,
                               errors.check_level())
            if key is not None:
                _store(self._combine_plans, key, plan)
        errors.raise_pending()
        return plan(self, x, topk_idx, topk_weights, handle, out, combine_wait_recv_cost_stats)

    def _send_region(self, layout: BufferLayout, idx: int, L: int, rows: int, hidden: int) -> torch.Tensor:
        return self.peer.view(self.rank, layout.send(idx), (L, rows, hidden), torch.bfloat16)

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """The bf16 [L, R*M, H] send buffer the next combine reads when called with zero_copy=True."""
        _, _, M, hidden, num_experts, *_ = self._check_handle(handle)
        layout = self._layout(M, hidden, num_experts)
        return self._send_region(layout, self.buffer_idx, num_experts // self.num_ranks, self.num_ranks * M, hidden)

    # -- maintenance ---------------------------------------------------------------------------------
    def _barrier(self) -> None:
        launch_barrier(self.num_ranks, ptr_table=self.peer.ptr_table, rank=self.rank, epoch=self.barrier_epoch,
                       mask=self.mask, timeout_ns=self.timeout_ns)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zero every flag and epoch of both buffers between two device barriers (collective; no host sync).

        Needed after a rank was masked (its late writes may have left flags behind) or after the
        buffer memory was used for something else."""
        check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        self._check_experts(num_experts)
        layout = self._layout(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._barrier()
        for idx in (0, 1):
            self.peer.view(self.rank, layout.flags(idx), (layout.flags_bytes // 4,), torch.int32).zero_()
        self.tickets.zero_()
        self.epochs.zero_()
        self._barrier()

    def destroy(self) -> None:
        self._rings.clear()   # the output sets go back to torch's allocator (results still held stay valid)
        self.peer.close()

