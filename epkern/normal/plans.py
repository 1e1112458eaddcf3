"""Per-signature plans of the NVLink backend's cached dispatch and its combine: what every call repeats, made once.

Buffer checks a cached dispatch (a handle given) or a combine in full the first time its signature is
seen: the payload's shapes, strides and dtypes, the handle's row and token counts and host-known
maxima, the other tensors' signatures, the config's SM count. A later call of the same signature
passed every check then (they depend on nothing else), so it allocates its fresh outputs and launches
one prepared kernel per round (codegen.launch.Launcher with the argument list bound once,
KernelParams.bind); only the pointers and the round index change. Outputs are never reused: they
belong to the caller, as DeepEP's. What the plans do not take (strided payloads, a payload that needs
packing or the scales copied, a handle rebuilt from a plain tuple) goes the backend's full way.

A cached dispatch writes no recv_src_idx (a null pointer: the handle already holds it, and it would
be the same rows); everything else matches NvlinkBackend.dispatch and .combine launch for launch.
"""
from __future__ import annotations

import torch

from . import kernels as ik
from . import rounds as rd
from ..call_plans import fresh_output
from .handle import DispatchHandle

PLAN_LIMIT = 256  # signatures kept per direction (a new token or row count is a new signature)


def handle_key(handle):
    """What a handle's checks and a plan depend on, or None for a handle the plans do not take (a plain
    tuple, or one whose maxima the host does not know)."""
    if type(handle) is not DispatchHandle or handle.max_remote_rows is None:
        return None
    rank_prefix, _, _, recv_src_idx, in_rank, send_head = handle
    return (rank_prefix.shape, recv_src_idx.shape, in_rank.shape, send_head.shape, send_head.get_device(),
            handle.max_remote_rows, handle.max_tokens)


def _launchers(backend, spec, entry: str, params, dynamic: str, smem: int = 0, **static):
    module = ik.get_module(spec, backend.device.index)
    launcher = module.launcher(entry, spec.num_sms, spec.threads, params.codes, smem=smem)
    bound = params.bind(dynamic, rank=backend.rank, seq_word=backend.seq_word, ptr_table=backend.peer.ptr_table,
                        flags_off=backend.layout.flags_off, payload_off=backend.layout.payload_off,
                        timeout_ns=backend.timeout_ns, status=backend.status.device_ptr, **static)
    return launcher, bound


class CachedDispatchPlan:
    """Buffer.dispatch with a handle, for contiguous bf16-format rows or fp8 rows with contiguous
    [T, H/128] 4-byte scales: recv_x (and its scales) in the input's dtypes, one launch per round."""

    def __init__(self, backend, x: torch.Tensor, scales: torch.Tensor | None, handle: DispatchHandle, num_sms: int):
        T, H = x.shape
        fp8 = scales is not None
        width = H if fp8 else H * x.element_size() // 2   # the kernels' row: fp8 [H], else bf16 [row bytes / 2]
        capacity = backend.layout.slot_capacity(ik.dispatch_slot_bytes(width, 0, fp8))
        self.rounds = rd.dispatch_plan(handle.max_remote_rows, capacity)
        self.rows = handle.num_recv_rows
        self.backend, self.device = backend, x.device
        self.new_x = fresh_output((self.rows, H), x.dtype, self.device)
        self.new_scales = fresh_output((self.rows, scales.shape[1]), scales.dtype, self.device) if fp8 else None
        spec = ik.dispatch_spec(backend.num_ranks, width, 0, fp8, num_sms)
        self.launch, self.args = _launchers(
            backend, spec, "dispatch", ik.DISPATCH_PARAMS,
            "x x_scales send_head rank_prefix_matrix recv_x recv_x_scales round_index",
            topk_idx=None, topk_weights=None, num_tokens=T, num_out_rows=self.rows, experts_per_rank=1,
            slot_capacity=capacity, recv_topk_idx=None, recv_topk_weights=None, recv_src_idx=None,
            num_rounds=self.rounds.num_rounds, window=self.rounds.window)

    @staticmethod
    def takes(x: torch.Tensor, scales: torch.Tensor | None) -> bool:
        """Whether a checked payload goes to the kernels as it is (no view to bf16 bytes, no copy)."""
        if not x.is_contiguous():
            return False
        if scales is None:
            return x.element_size() == 2
        return x.shape[1] % 128 == 0 and scales.shape[1] == x.shape[1] // 128 and scales.is_contiguous()

    def __call__(self, stream: int, x: torch.Tensor, scales: torch.Tensor | None, handle: DispatchHandle):
        recv_x = self.new_x()
        recv_scales = None if self.new_scales is None else self.new_scales()
        x_ptr, s_ptr = x.data_ptr(), 0 if scales is None else scales.data_ptr()
        prefix, head, out = handle[0].data_ptr(), handle[5].data_ptr(), recv_x.data_ptr()
        out_s = 0 if recv_scales is None else recv_scales.data_ptr()
        for k in range(self.rounds.num_rounds):
            self.backend.launches += 1
            self.launch(stream, *self.args(x_ptr, s_ptr, head, prefix, out, out_s, k))
        return recv_x, recv_scales


class CombinePlan:
    """Buffer.combine for one signature: combined_x [T, H] (and the combined weights), one launch per round."""

    def __init__(self, backend, x: torch.Tensor, handle: DispatchHandle, topk_weights, biases: tuple, num_sms: int):
        R, T, H = backend.num_ranks, handle.num_tokens, x.shape[1]
        K = topk_weights.shape[1] if topk_weights is not None else 0
        capacity = backend.layout.slot_capacity(ik.combine_slot_bytes(H, K))
        self.rounds = rd.combine_plan(handle.max_tokens, capacity, R)
        self.backend, self.device = backend, x.device
        self.num_biases = len(biases)
        self.new_out = fresh_output((T, H), torch.bfloat16, self.device)
        self.new_weights = fresh_output((T, K), torch.float32, self.device) if K else None
        spec = ik.combine_spec(R, H, K, num_sms)
        self.launch, self.args = _launchers(
            backend, spec, "combine", ik.COMBINE_PARAMS,
            "x topk_weights recv_src_idx rank_prefix_matrix send_head bias0 bias1 combined_x combined_weights "
            "round_index", smem=spec.dynamic_smem, num_tokens=T, slot_capacity=capacity,
            num_rounds=self.rounds.num_rounds, window=self.rounds.window)

    def __call__(self, stream: int, x: torch.Tensor, handle: DispatchHandle, topk_weights, biases: tuple):
        combined = self.new_out()
        weights = None if self.new_weights is None else self.new_weights()
        b0 = biases[0].data_ptr() if self.num_biases > 0 else 0
        b1 = biases[1].data_ptr() if self.num_biases > 1 else 0
        pointers = (x.data_ptr(), 0 if topk_weights is None else topk_weights.data_ptr(), handle[3].data_ptr(),
                    handle[0].data_ptr(), handle[5].data_ptr(), b0, b1, combined.data_ptr(),
                    0 if weights is None else weights.data_ptr())
        for k in range(self.rounds.num_rounds):
            self.backend.launches += 1
            self.launch(stream, *self.args(*pointers, k))
        return combined, weights
