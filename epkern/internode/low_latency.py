"""Low-latency mode over torch.distributed collectives: across nodes, GPUs without peer access, CPU.

`CollectiveLowLatency` has DeepEP's low_latency_* methods with the NVLink LowLatencyBuffer's
semantics and return shapes (packed recv_x [L, R*M, H], bf16 or FP8 with the same scales, recv
count per expert, a LowLatencyHandle, event, hook; combine with the top-k weights and the handle),
on the portable engine: `all_to_all_single` with fixed, equal split sizes (NCCL between GPUs,
gloo on CPU). Each rank sends every rank one fixed-size block of M token rows and a header row
(epkern.internode.low_latency_blocks), whatever the routing: a token crosses once per rank, and
the receiver fans it out to its local experts. Nothing waits for a count on the host, so under
NCCL a dispatch or combine is stream-ordered work only and captures into a CUDA graph.

The transfer is NCCL's own kernel on NCCL's stream (it takes an SM or a few; nothing of epkern's
spins on a flag): without a hook the call returns with the current stream ordered after the
transfer and the unpacking; with return_recv_hook=True the collective is issued (async) and the
hook orders the current stream after it and unpacks, so work issued in between overlaps the
transfer. On gloo the collective runs on the host: the hook blocks until it completes.

The cost of fixed sizes: every rank sends R blocks of (M + 1) rows per dispatch, and R blocks of
M bf16 rows per combine, however few tokens it has or however they are routed
(benchmarks/internode_notes.md has the bytes at EP 16-64).

Agreement and timeouts (epkern.normal.header.CallHeaders, as the torch backends): before a call
of a configuration (M, hidden, experts, top-k, format) the ranks exchange a header through the
group's store, under timeout_s: a rank that does not arrive raises PeerTimeoutError naming it on
every waiting rank, ranks that disagree raise one ValueError. On a host (gloo) group that header
precedes every call and the data collective also waits under timeout_s; on NCCL only the first
call of each configuration exchanges it (the steady state has no host step), and a peer that
stops calling is NCCL's group timeout (init_process_group(timeout=...)).

Masking (low_latency_update_mask_buffer): a masked rank is sent no tokens (its block's count is
0), its blocks are ignored, and combine adds nothing from it, as on NVLink. It stays in the
collective, so it must still make every call; a rank that died cannot be masked around (shrink
the group instead). dispatch/combine_wait_recv_cost_stats are accepted and left unchanged: a
collective has no per-rank arrival time. use_logfmt=True sends bf16 rows (exact, so within
LogFMT's error bound): in a fixed-size block LogFMT would save no bytes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..events import EventOverlap
from ..hooks import once
from ..low_latency.buffer import LowLatencyChecks
from ..low_latency.handle import LowLatencyHandle
from ..low_latency.kernels import dispatch_kind
from ..normal.header import CallHeaders
from ..validate import check_positive_int
from . import low_latency_blocks as blocks


def _on_nccl(group) -> bool:
    try:
        return "nccl" in str(dist.get_backend(group))
    except Exception:   # a fake or foreign group: treat as host
        return False


def default_device(group) -> torch.device:
    """CUDA tensors over an NCCL group (this process's GPU), CPU tensors otherwise (gloo moves CPU tensors)."""
    if _on_nccl(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CollectiveLowLatency(LowLatencyChecks):
    """DeepEP's low_latency_* methods over all_to_all_single (see the module docstring)."""

    peer = None   # no peer buffer

    def __init__(self, group, num_bytes: int, timeout_s: float | None = None, num_sms: int | None = None,
                 device: torch.device | str | None = None):
        check_positive_int("num_bytes", num_bytes)
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_bytes = int(num_bytes)
        self.num_sms = num_sms   # kept for Buffer.low_latency_num_sms: NCCL chooses its own SMs
        device = torch.device(device) if device is not None else default_device(group)
        if self.num_ranks > 1 and (device.type == "cuda") != _on_nccl(group):
            raise ValueError(f"device={device}: a {dist.get_backend(group)} group moves "
                             f"{'CPU' if device.type == 'cuda' else 'CUDA'} tensors; CUDA tensors need an NCCL group, "
                             "CPU tensors a gloo one")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.headers = CallHeaders(group, self.rank, self.num_ranks, timeout_s, "low-latency collective")
        self.timeout_s = self.headers.timeout_s
        self.mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        self.buffer_idx = 0
        self._agreed: set = set()
        self._zero_copy: dict[int, torch.Tensor] = {}
        self._local: torch.Tensor | None = None

    # -- helpers -------------------------------------------------------------------------------------
    def _next_buffer(self) -> int:
        idx = self.buffer_idx
        self.buffer_idx ^= 1
        return idx

    def _agree(self, op: str, agree: dict) -> None:
        """The call header: every call on a host group, each configuration's first call on NCCL."""
        key = (op, tuple(sorted(agree.items())))
        if self.device.type == "cpu" or key not in self._agreed:
            self.headers.exchange(op, agree)
            self._agreed.add(key)

    def _exchange(self, send: torch.Tensor, op: str):
        """Issue the equal-split all_to_all_single of send; returns (recv, wait)."""
        recv = torch.empty_like(send)
        return recv, self.headers.start_all_to_all(recv, send, None, None, self.group, op)

    @staticmethod
    def _finish(receive, return_recv_hook: bool):
        if return_recv_hook:
            return once(receive)
        receive()
        return None

    # -- dispatch ------------------------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False, topk_weights: torch.Tensor | None = None):
        """As epkern.low_latency.LowLatencyBuffer.low_latency_dispatch: (recv_x, recv_count, handle, event, hook).

        One all_to_all_single of R blocks of (M + 1) x row_bytes bytes (the rows of DispatchRows:
        payload, scales, int32 top-k ids, carried weights). With return_recv_hook the outputs are
        filled when the hook runs (a second call raises); the hook is None otherwise."""
        M = num_max_dispatch_tokens_per_rank
        self._check_dispatch_args(x, topk_idx, M, num_experts, cumulative_local_expert_recv_stats,
                                  dispatch_wait_recv_cost_stats, use_fp8, async_finish, return_recv_hook, topk_weights)
        kind = dispatch_kind(use_fp8, round_scale, use_ue8m0)
        num_tokens, hidden = x.shape
        K = topk_idx.shape[1]
        fmt = blocks.DispatchRows(kind, hidden, K, carry_weights=topk_weights is not None)
        L, R = num_experts // self.num_ranks, self.num_ranks
        self._agree("dispatch", dict(max_tokens=M, hidden=hidden, num_experts=num_experts, num_topk=K, kind=kind,
                                     carry_weights=fmt.carry_weights))
        self._next_buffer()

        dev = self.device
        recv_x = torch.empty(L, R * M, hidden, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=dev)
        recv_scales = None
        if use_fp8:  # allocated [L, S, R*M] and transposed: column-major per expert, as on NVLink
            recv_scales = torch.empty(L, fmt.scale_cols, R * M, dtype=fmt.scale_dtype, device=dev).transpose(1, 2)
        out = blocks.DispatchOutputs(
            recv_x=recv_x, recv_scales=recv_scales, recv_count=torch.empty(L, dtype=torch.int32, device=dev),
            src_info=torch.empty(L, R * M, dtype=torch.int32, device=dev),
            layout_range=torch.empty(L, R, dtype=torch.int64, device=dev),
            token_rows=torch.empty(R, M, K, dtype=torch.int32, device=dev),
            recv_tokens=torch.empty(R, dtype=torch.int32, device=dev),
            token_weights=torch.empty(R, M, K, dtype=torch.float32, device=dev) if fmt.carry_weights else None)

        send = blocks.pack_dispatch(fmt, x, topk_idx, topk_weights, M, R, self.mask)
        recv, wait = self._exchange(send, "dispatch")

        def receive():
            wait()
            blocks.unpack_dispatch(fmt, recv, self.rank, L, self.mask, out)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(out.recv_count)

        hook = self._finish(receive, return_recv_hook)
        handle = LowLatencyHandle(out.src_info, out.layout_range, M, hidden, num_experts, token_rows=out.token_rows,
                                  recv_tokens=out.recv_tokens, token_weights=out.token_weights)
        event = EventOverlap.record(extra_tensors=(x, topk_idx, topk_weights, recv_x, recv_scales, out.recv_count,
                                                   out.src_info, out.layout_range, out.token_rows, out.token_weights,
                                                   out.recv_tokens)) \
            if async_finish else EventOverlap()
        packed = (recv_x, recv_scales) if use_fp8 else recv_x
        return packed, out.recv_count, handle, event, hook

    # -- combine -------------------------------------------------------------------------------------
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None,
                            handle: tuple, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None):
        """As epkern.low_latency.LowLatencyBuffer.low_latency_combine: (combined_x [T, H] bf16, event, hook).

        Each rank sums a token's rows on its experts (fp32, weighted, rounded to bf16) and sends one
        row per (token, rank) back in a fixed block of M rows per rank; the source adds them in fp32.
        Without weights carried by the dispatch a first, small all_to_all_single ([R, M, K] fp32)
        brings every rank the top-k weights of the tokens it holds (DeepEP's combine sends weighted
        rows too). use_logfmt: rows travel as bf16 (see the module docstring)."""
        src_info, layout_range, M, hidden, num_experts, token_rows, recv_tokens, token_weights = \
            self._check_combine_args(x, topk_idx, topk_weights, handle, zero_copy, async_finish, return_recv_hook, out,
                                     combine_wait_recv_cost_stats)
        num_tokens, K = topk_idx.shape
        R = self.num_ranks
        carried = token_weights is not None
        self._agree("combine", dict(max_tokens=M, hidden=hidden, num_experts=num_experts, num_topk=K,
                                    carried_weights=carried))
        idx = self._next_buffer()
        source = self._zero_copy_buffer(idx, M, hidden, num_experts) if zero_copy else x
        combined = out if out is not None else torch.empty(num_tokens, hidden, dtype=torch.bfloat16,
                                                           device=self.device)
        if carried:
            weights = token_weights
        else:
            weights, wait_weights = self._exchange(blocks.pack_weights(topk_weights, M, R), "combine weights")
            wait_weights()
        send = blocks.reduce_partials(source, token_rows, weights, self.mask)
        back, wait = self._exchange(send, "combine")

        def receive():
            wait()
            blocks.sum_partials(back, self.mask, combined)

        hook = self._finish(receive, return_recv_hook)
        event = EventOverlap.record(extra_tensors=(x, topk_idx, topk_weights, token_rows, token_weights, recv_tokens,
                                                   combined)) \
            if async_finish else EventOverlap()
        return combined, event, hook

    # -- zero copy, maintenance ----------------------------------------------------------------------
    def _zero_copy_buffer(self, idx: int, M: int, hidden: int, num_experts: int) -> torch.Tensor:
        shape = (num_experts // self.num_ranks, self.num_ranks * M, hidden)
        buf = self._zero_copy.get(idx)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._zero_copy[idx] = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        return buf

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """The bf16 [L, R*M, H] tensor the next combine reads when called with zero_copy=True."""
        _, _, M, hidden, num_experts, *_ = self._check_handle(handle)
        return self._zero_copy_buffer(self.buffer_idx, M, hidden, num_experts)

    def local_buffer(self) -> torch.Tensor:
        """num_bytes of this rank's own (Buffer.get_local_buffer_tensor(use_rdma_buffer=True)): the
        collective path needs no registered buffer, so this one is private."""
        if self._local is None:
            self._local = torch.zeros(self.num_bytes, dtype=torch.uint8, device=self.device)
        return self._local

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Checks its arguments; nothing else to do: no flag or count outlives a call here."""
        check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        check_positive_int("hidden", hidden)
        self._check_experts(num_experts)

    def destroy(self) -> None:
        self._zero_copy.clear()
        self._local = None
