"""Per-signature call plans of the NVLink low-latency buffer: what every call of a signature repeats, made once.

LowLatencyBuffer checks a call's arguments in full the first time a (shapes, strides, dtypes,
devices, options, check level) signature is seen and keeps a plan for it; a later call of the same
signature passed every check then (they depend on nothing else) and only takes its outputs and
launches the prepared kernels (kernels.DispatchLaunch / CombineLaunch).

Outputs come from two sets per output signature, used in turn (OutputRing), as DeepEP documents for
these calls: "as there are only two buffers, and the returned tensors reuse the buffer, you cannot
hold more than 2 low-latency kernels' result tensors at a single moment". A dispatch's set is its
recv_x (and scales), recv_count and handle, the same for every token count; a combine's is its
output [T, H] (none with out=). The third call of an output signature writes into the first call's
tensors; each set is allocated at its first use, so a later call makes no tensor and no handle (its
host time is the launch). A buffer keeps the sets of its last 16 output signatures (buffer._RING_LIMIT).
Stream order makes the reuse safe on one stream: the call's kernels run after everything enqueued
before it, including the work that read the set last.

Values are checked on the device (EPKERN_CHECK_VALUES=1, epkern.errors): dispatch drops a top-k id
outside [-1, num_experts) and counts it, and the next checked call raises DeviceCheckError; combine
drops such an id too (its ids must be the dispatch's, which counted them). Level 2 adds the host
check before each launch (one sync per call).
"""
from __future__ import annotations

import torch

from epkern import errors
from epkern.codegen.launch import current_stream_handle

from ..events import EventOverlap
from ..validate import check_range
from .handle import LowLatencyHandle
from .kernels import CombineLaunch, DispatchLaunch, LowLatencySpec


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


class DispatchPlan:
    """low_latency_dispatch of one signature (see LowLatencyBuffer.low_latency_dispatch)."""

    def __init__(self, buf, x: torch.Tensor, topk_idx: torch.Tensor, M: int, num_experts: int, kind: str,
                 carry: bool, with_hook: bool, async_finish: bool, level: int):
        (T, H), K, R = x.shape, topk_idx.shape[1], buf.num_ranks
        L, rows = num_experts // R, R * M
        spec = LowLatencySpec(kind, H, R, num_experts, K, carry_weights=carry)
        layout = buf._layout(M, H, num_experts)
        self.device, self.dev = buf.device, buf.device.index
        err = err_any = 0
        if level >= 1:
            err, err_any = errors.site(self.dev, f"low_latency_dispatch: topk_idx ({spec.name}) outside "
                                                 f"[-1, {num_experts})")
        self.launch = DispatchLaunch(spec, layout, buf.num_sms, T, with_hook, self.dev, buf, err, err_any)
        self.M, self.hidden, self.num_experts = M, H, num_experts
        self.fp8, self.carry, self.async_finish, self.host_check = spec.use_fp8, carry, async_finish, level == 2
        self.recv_shape = (L, rows, H)
        self.recv_dtype = torch.float8_e4m3fn if spec.use_fp8 else torch.bfloat16
        # the scales are column-major per expert: [L, S, R*M] storage seen as [L, R*M, S]
        cols = -(-H // 512) if kind == "fp8_ue8m0" else H // 128
        self.scale_shape, self.scale_strides = (L, rows, cols), (cols * rows, 1, rows)
        self.scale_dtype = torch.int32 if kind == "fp8_ue8m0" else torch.float32
        self.L, self.R, self.rows, self.token_shape = L, R, rows, (R, M, K)
        self.ring_key = ("dispatch", kind, M, H, num_experts, K, carry)

    def _outputs(self):
        """One set of outputs: (what the call returns before its event, the output pointers, every tensor)."""
        dev = self.device
        recv_x = torch.empty(self.recv_shape, dtype=self.recv_dtype, device=dev)
        recv_scales = (torch.empty_strided(self.scale_shape, self.scale_strides, dtype=self.scale_dtype, device=dev)
                       if self.fp8 else None)
        recv_count = torch.empty(self.L, dtype=torch.int32, device=dev)
        src_info = torch.empty((self.L, self.rows), dtype=torch.int32, device=dev)
        layout_range = torch.empty((self.L, self.R), dtype=torch.int64, device=dev)
        token_rows = torch.empty(self.token_shape, dtype=torch.int32, device=dev)
        token_weights = torch.empty(self.token_shape, dtype=torch.float32, device=dev) if self.carry else None
        recv_tokens = torch.empty(self.R, dtype=torch.int32, device=dev)
        handle = LowLatencyHandle(src_info, layout_range, self.M, self.hidden, self.num_experts,
                                  token_rows=token_rows, recv_tokens=recv_tokens, token_weights=token_weights)
        pointers = (recv_x.data_ptr(), _ptr(recv_scales), recv_count.data_ptr(), src_info.data_ptr(),
                    layout_range.data_ptr(), token_rows.data_ptr(), _ptr(token_weights), recv_tokens.data_ptr())
        result = ((recv_x, recv_scales) if self.fp8 else recv_x, recv_count, handle)
        return result, pointers, (recv_x, recv_scales, recv_count, src_info, layout_range, token_rows, token_weights,
                                  recv_tokens)

    def __call__(self, buf, x, topk_idx, topk_weights, cumulative_stats, wait_stats):
        if self.host_check:
            check_range("topk_idx", topk_idx, -1, self.num_experts)
        (recv, recv_count, handle), pointers, tensors = buf._output_ring(self.ring_key).next(self._outputs)
        hook = self.launch(current_stream_handle(self.dev), buf._next_buffer(),
                           (x.data_ptr(), topk_idx.data_ptr(), _ptr(topk_weights)),
                           pointers + (_ptr(cumulative_stats), _ptr(wait_stats)))
        event = EventOverlap.record(extra_tensors=(x, topk_idx, topk_weights) + tensors) \
            if self.async_finish else EventOverlap()
        return recv, recv_count, handle, event, hook


class CombinePlan:
    """low_latency_combine of one signature (see LowLatencyBuffer.low_latency_combine)."""

    def __init__(self, buf, topk_idx: torch.Tensor, handle: LowLatencyHandle, use_logfmt: bool, zero_copy: bool,
                 with_hook: bool, async_finish: bool, level: int):
        _, _, M, H, E = handle
        (T, K), R = topk_idx.shape, buf.num_ranks
        spec = LowLatencySpec("combine_logfmt" if use_logfmt else "combine", H, R, E, K)
        layout = buf._layout(M, H, E)
        self.device, self.dev = buf.device, buf.device.index
        self.launch = CombineLaunch(spec, layout, buf.num_sms, T, with_hook, self.dev, buf)
        # zero copy: the rows are read from the send region of the buffer the call takes
        self.send_region = ([buf._send_region(layout, i, E // R, R * M, H).data_ptr() for i in (0, 1)]
                            if zero_copy else None)
        self.out_shape, self.async_finish, self.host_check, self.num_experts = (T, H), async_finish, level == 2, E
        self.ring_key = ("combine", T, H)

    def _output(self) -> torch.Tensor:
        return torch.empty(self.out_shape, dtype=torch.bfloat16, device=self.device)

    def __call__(self, buf, x, topk_idx, topk_weights, handle, out, wait_stats):
        if self.host_check:
            check_range("topk_idx", topk_idx, -1, self.num_experts)
        token_rows, recv_tokens, token_weights = handle.token_rows, handle.recv_tokens, handle.token_weights
        combined = out if out is not None else buf._output_ring(self.ring_key).next(self._output)
        idx = buf._next_buffer()
        source = self.send_region[idx] if self.send_region is not None else x.data_ptr()
        hook = self.launch(current_stream_handle(self.dev), idx,
                           (source, token_rows.data_ptr(), recv_tokens.data_ptr(), _ptr(topk_weights),
                            _ptr(token_weights)),
                           (combined.data_ptr(), topk_idx.data_ptr(), _ptr(wait_stats)))
        event = EventOverlap.record(extra_tensors=(x, topk_idx, topk_weights, token_rows, token_weights, recv_tokens,
                                                   combined)) \
            if self.async_finish else EventOverlap()
        return combined, event, hook


class OutputRing:
    """The two output sets of one output signature, handed out in turn (see the module docstring)."""

    __slots__ = ("_sets", "_turn")

    def __init__(self):
        self._sets, self._turn = [None, None], 1

    def next(self, make):
        """The next set; make() allocates it the first time."""
        self._turn ^= 1
        found = self._sets[self._turn]
        if found is None:
            found = self._sets[self._turn] = make()
        return found
