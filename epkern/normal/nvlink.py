"""NVLink normal-mode backend: dispatch and combine through CUDA-IPC peer buffers.

Each call is a few kernel launches on the caller's (communication) stream:
  dispatch = notify (counts exchange, rank prefix matrix, every token's final row) then, after the
  host reads the counts from host-mapped memory (skipped with num_worst_tokens), the one-copy
  dispatch kernel, once per round; cached dispatch reuses the handle and skips notify.
  combine = the combine kernel, once per round.
What does not fit the peer buffer at once streams through it in rounds (epkern/normal/rounds.py):
one round when it fits, so the one-shot path is unchanged; any number of tokens otherwise, with
no memory beyond the buffer and the outputs.
Every launch takes the next sequence number from a device-side counter (so a CUDA graph of
dispatch with num_worst_tokens and combine replays with fresh numbers: no replay passes a barrier
on an earlier replay's flags); all ranks issue the same launches in the same order, so their
numbers agree, and every rank plans the same rounds from the same exchanged maxima. A
kernel that waits past the timeout reports (kernel, rank) in a host-mapped status word; the host
raises TimeoutError from it at the next call (or at once while waiting for the notify counts).
Every kernel returns at once when the status word is set, so a failed call ends within about one
timeout whatever its number of rounds. After a failure the buffer stays failed: destroy it.
"""
from __future__ import annotations

import ctypes
import time

import torch

from epkern.codegen.launch import current_stream_handle

from . import kernels as ik
from . import rounds as rd
from .handle import DispatchHandle
from ..peer_memory import HostMapped, PeerBuffer


class PeerTimeoutError(TimeoutError):
    """A peer rank did not arrive within the timeout."""


class BufferOverflowError(RuntimeError):
    """A row did not fit a rank's peer buffer."""


class NvlinkBackend:
    name = "nvlink"
    carries_any_row = False   # bf16 rows, or fp8 rows + fp32 [T, H/128] scales (Buffer fits the rest)
    stream_calls = True       # cached dispatch and combine: outputs and launches only, on stream= (Buffer._launch)

    def __init__(self, group, rank: int, num_ranks: int, num_nvl_bytes: int, timeout_s: float):
        if num_ranks > ik.MAX_RANKS:
            raise ValueError(f"the NVLink backend supports up to {ik.MAX_RANKS} ranks, the group has {num_ranks}")
        min_bytes = ik.MIN_PEER_BYTES
        if num_nvl_bytes < min_bytes:
            raise ValueError(f"num_nvl_bytes={num_nvl_bytes}: the NVLink backend needs at least {min_bytes} bytes; "
                             "size it with Config.get_nvl_buffer_size_hint")
        self.group, self.rank, self.num_ranks = group, rank, num_ranks
        self.timeout_s = float(timeout_s)
        self.peer = PeerBuffer(group, num_nvl_bytes)
        self.layout = ik.PeerLayout(num_nvl_bytes)
        self.status = HostMapped(64)
        self._status_word = self.status.host_array(ctypes.c_uint32, 1)
        self.device = self.peer.device
        # the kernels' sequence numbers: a device-side counter each launch advances (so CUDA-graph
        # replays take fresh numbers); {last launch's number, warps done with the current one}
        self.seq_word = torch.zeros(2, dtype=torch.int32, device=self.device)
        self._host_out = HostMapped(4 * (4 + 4096))   # notify's counts, allocated before any capture
        self.launches = 0   # kernels launched eagerly or captured (the device counts replays too)
        self._call_id = 0   # which notify's counts the host waits for
        self._failed = ""   # set when the host gave up waiting

    # -- bookkeeping -------------------------------------------------------------------------------
    def _next_launch(self) -> None:
        self.raise_if_failed()
        self.launches += 1

    @property
    def timeout_ns(self) -> int:
        return int(self.timeout_s * 1e9)

    def raise_if_failed(self) -> None:
        if self._failed:
            raise PeerTimeoutError(self._failed)
        word = int(self._status_word[0])
        if not word:
            return
        kind, kernel, peer = ik.decode_status(word)
        name = f"intranode {kernel}"
        if kind == ik.STATUS_TIMEOUT:
            raise PeerTimeoutError(f"{name} on rank {self.rank}: rank {peer} did not arrive within {self.timeout_s:g} s "
                                   "(it died, hangs, or issued different calls); this buffer is unusable, destroy it")
        raise BufferOverflowError(f"{name} on rank {self.rank}: rows for rank {peer} do not fit its output or its "
                                  f"{self.layout.nbytes}-byte peer buffer in the rounds planned: with "
                                  "num_worst_tokens, it must be at least the rows any rank receives, and combine "
                                  "after it takes one round (dispatch without num_worst_tokens to stream any number)")

    def _host_counts(self, experts_per_rank: int):
        words = 4 + experts_per_rank
        if self._host_out.nbytes < 4 * words:
            if torch.cuda.is_current_stream_capturing():
                raise ValueError(f"{experts_per_rank} experts per rank: run one dispatch before capturing a CUDA "
                                 "graph (the counts buffer grows outside capture only)")
            torch.cuda.synchronize(self.device)
            self._host_out.close()
            self._host_out = HostMapped(4 * words)
        return self._host_out

    def _wait_counts(self, call_id: int, experts_per_rank: int) -> list[int]:
        """Busy-wait (with the timeout) until notify published its counts to host memory."""
        out = self._host_out.host_array(ctypes.c_uint32, 4 + experts_per_rank)
        # the kernel's own deadline (from its start, just after this launch) comes first and its report
        # names the missing rank; 0.25 s later the host stops waiting all the same
        deadline = time.monotonic() + self.timeout_s + 0.25
        while out[0] != call_id:
            self.raise_if_failed()
            if time.monotonic() > deadline:
                self._failed = (f"intranode notify on rank {self.rank}: no counts within {self.timeout_s:g} s (a peer "
                                "did not arrive, or the communication stream is blocked); this buffer is unusable, "
                                "destroy it")
                raise PeerTimeoutError(self._failed)
        return list(out[1:4 + experts_per_rank])

    # -- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, *, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, expert_alignment: int, num_worst_tokens: int, handle, config, stream=None):
        """stream: the raw handle to launch on (the current stream by default)."""
        R, rank, device = self.num_ranks, self.rank, x.device
        stream = current_stream_handle(device.index) if stream is None else stream
        T, H = x.shape
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        fp8 = x_scales is not None
        capacity = self.layout.slot_capacity(ik.dispatch_slot_bytes(H, num_topk, fp8))
        per_expert_list = None
        max_tokens = None
        if handle is None:
            experts_per_rank = num_tokens_per_expert.numel() // R
            if R * (R + 1 + experts_per_rank) > self.layout.counts_capacity():
                raise ValueError(f"num_experts={num_tokens_per_expert.numel()}: too many experts per rank for the "
                                 f"counts table ({self.layout.counts_capacity()} ints)")
            rank_prefix = torch.empty(R, R, dtype=torch.int32, device=device)
            send_head = torch.empty(T, R, dtype=torch.int32, device=device)
            recv_expert_counts = torch.empty(max(experts_per_rank, 1), dtype=torch.int32, device=device)
            host_out = self._host_counts(experts_per_rank)
            self._next_launch()
            self._call_id = (self._call_id + 1) & 0xFFFFFFFF or 1
            call_id = self._call_id
            ik.launch_notify(stream, R, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, expert_alignment,
                             rank, self.seq_word, call_id, self.peer.ptr_table, self.timeout_ns, rank_prefix,
                             send_head, recv_expert_counts, host_out.device_ptr, self.status.device_ptr)
            if num_worst_tokens > 0:
                # no host sync: every rank plans from num_worst_tokens (>= any rank's received rows)
                rows = max_remote = num_worst_tokens
                per_expert_list = []
            else:
                counts = self._wait_counts(call_id, experts_per_rank)
                rows, max_remote, max_tokens = counts[0], counts[1], counts[2]
                per_expert_list = counts[3:3 + experts_per_rank]
        else:
            experts_per_rank = 1
            rank_prefix, send_head, is_token_in_rank = handle.rank_prefix_matrix, handle.send_head, handle.is_token_in_rank
            rows = handle.num_recv_rows
            max_remote = handle.max_remote_rows
            if max_remote is None:   # a handle rebuilt from a plain tuple: the prefix matrix is the same everywhere
                max_remote = rd.max_remote_rows(rank_prefix.tolist())
        # every rank sees the same maxima, so every rank plans (or raises) alike
        plan = rd.dispatch_plan(max_remote, capacity)

        recv_x = torch.empty(rows, H, dtype=x.dtype, device=device)
        recv_scales = torch.empty(rows, H // 128, dtype=torch.float32, device=device) if fp8 else None
        recv_topk_idx = torch.empty(rows, num_topk, dtype=torch.int64, device=device) if num_topk else None
        recv_topk_weights = (torch.empty(rows, num_topk, dtype=torch.float32, device=device)
                             if num_topk and topk_weights is not None else None)
        recv_src_idx = torch.empty(rows, dtype=torch.int32, device=device)
        spec = ik.dispatch_spec(R, H, num_topk, fp8, config.num_sms)
        for k in range(plan.num_rounds):
            self._next_launch()
            ik.launch_dispatch(stream, spec, x, x_scales, topk_idx, topk_weights, send_head, rank_prefix, rows,
                               experts_per_rank, rank, self.seq_word, self.peer.ptr_table, self.layout, capacity,
                               self.timeout_ns, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx,
                               self.status.device_ptr, k, plan.num_rounds, plan.window)
        if handle is None:
            sent = torch.diff(rank_prefix, dim=0, prepend=torch.zeros(1, R, dtype=torch.int32, device=device))[rank]
            sent = sent.view(R, 1).contiguous()
            handle = DispatchHandle(rank_prefix, sent, torch.zeros_like(sent), recv_src_idx, is_token_in_rank, send_head)
            handle.max_remote_rows, handle.max_tokens = max_remote, max_tokens
        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle

    # -- combine -----------------------------------------------------------------------------------
    def combine(self, *, x, handle: DispatchHandle, topk_weights, bias, config, stream=None):
        R, device = self.num_ranks, x.device
        stream = current_stream_handle(device.index) if stream is None else stream
        T, H = handle.num_tokens, x.shape[1]
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        capacity = self.layout.slot_capacity(ik.combine_slot_bytes(H, num_topk))
        if handle.max_tokens is not None:
            plan = rd.combine_plan(handle.max_tokens, capacity, R)
        else:
            # after num_worst_tokens (or from a plain tuple) no rank knows the others' token counts: one
            # round, which must hold every rank's tokens (a rank past it is reported by the kernel)
            per_round = rd.combine_token_capacity(capacity, R)
            if T > per_round:
                raise ValueError(f"combine: {T} tokens, but after dispatch with num_worst_tokens (or with a handle "
                                 f"rebuilt from a plain tuple) combine takes one round of at most {per_round} tokens "
                                 f"per rank in this {self.layout.nbytes}-byte buffer; dispatch without "
                                 "num_worst_tokens to stream any number, or make num_nvl_bytes larger")
            plan = rd.RoundPlan(1, max(1, per_round))
        combined_x = torch.empty(T, H, dtype=x.dtype, device=device)
        combined_weights = torch.empty(T, num_topk, dtype=torch.float32, device=device) if num_topk else None
        bias0 = bias[0] if len(bias) > 0 else None
        bias1 = bias[1] if len(bias) > 1 else None
        spec = ik.combine_spec(R, H, num_topk, config.num_sms)
        for k in range(plan.num_rounds):
            self._next_launch()
            ik.launch_combine(stream, spec, x, topk_weights, handle.recv_src_idx, handle.rank_prefix_matrix,
                              handle.send_head, self.rank, self.seq_word, self.peer.ptr_table, self.layout, capacity,
                              self.timeout_ns, bias0, bias1, combined_x, combined_weights, self.status.device_ptr,
                              k, plan.num_rounds, plan.window)
        return combined_x, combined_weights

    def destroy(self) -> None:
        if self.peer is None:
            return
        torch.cuda.synchronize(self.device)
        self.peer.close()
        self.status.close()
        self._host_out.close()
        self.peer = None
