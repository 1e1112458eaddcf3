"""epkern.Buffer: a drop-in for deep_ep.Buffer (normal mode here; low-latency mode delegated).

    buffer = epkern.Buffer(group, num_nvl_bytes=int(1e9))          # backend="auto"|"nvlink"|"torch"
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk_idx, topk_weights=topk_weights)
    combined_x, combined_topk_weights, event = buffer.combine(expert_out, handle, topk_weights=recv_topk_weights)

Semantics follow DeepEP's V1 Buffer: received rows are ordered by source rank, then token index;
recv_topk_idx holds local expert ids and -1 for experts elsewhere; counts are rounded up to
expert_alignment; passing `handle` back repeats a layout; num_worst_tokens pads outputs and skips
the host sync. Work runs on a dedicated communication stream: it waits for `previous_event` (or
the current stream); with async_finish the returned EventOverlap tracks it, otherwise the current
stream waits for it before the call returns.

Backends: "nvlink" (CUDA-IPC peer buffers, JIT kernels; all ranks on one node), "torch"
(all_to_all_single; any process group, CPU/gloo included), "auto" (NVLink when every rank shares a
node with peer access and num_nvl_bytes > 0, else torch).
"""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from .normal import kernels as ik
from .normal.torch_backend import TorchBackend
from .normal.handle import check_handle
from .events import EventOverlap
from . import tuning
from .layout import get_dispatch_layout as _layout
from .validate import check_positive_int, check_range, check_tensor


class Config:
    """DeepEP's performance config. num_sms is the SM count the kernels use; the chunk sizes are
    kept for compatibility (the one-copy kernels have no ring buffer to chunk)."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        check_positive_int("num_sms", num_sms)
        if num_sms > ik.MAX_BLOCKS:
            raise ValueError(f"num_sms={num_sms}: at most {ik.MAX_BLOCKS}")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, num_max_tokens: int = 4096,
                                 num_topk: int = ik.MAX_TOPK) -> int:
        """Peer-buffer bytes for up to num_max_tokens tokens per rank with rows of hidden_bytes
        (hidden x max(element size, 2), as DeepEP users compute it)."""
        hidden = -(-hidden_bytes // 2)
        slot = max(ik.combine_slot_bytes(hidden, num_topk),
                   ik.dispatch_slot_bytes(-(-hidden // 8) * 8, num_topk, False))
        return ik.required_bytes(num_max_tokens * num_ranks, slot)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0  # intranode only: no RDMA buffer

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, nvl_send={self.num_max_nvl_chunked_send_tokens}, "
                f"nvl_recv={self.num_max_nvl_chunked_recv_tokens})")


class _DoneEvent(EventOverlap):
    """What async calls return where there is no stream (CPU): the work is already complete."""

    def current_stream_wait(self) -> None:
        pass


def _peer_access_everywhere(group, device: int) -> bool:
    """True on every rank iff all ranks share one host and each GPU can reach every other one."""
    me = (socket.gethostname(), device)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    ok = len({h for h, _ in everyone}) == 1 and all(
        d == device or torch.cuda.can_device_access_peer(device, d) for _, d in everyone)
    verdicts: list = [None] * len(everyone)
    dist.all_gather_object(verdicts, ok, group=group)
    return all(verdicts)


class Buffer:
    """DeepEP's Buffer API for intranode expert parallelism (see the module docstring)."""

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, *, backend: str = "auto", timeout_s: float | None = None):
        from epkern.codegen import knobs

        if backend not in ("auto", "nvlink", "torch"):
            raise ValueError(f"backend={backend!r}: allowed values are ['auto', 'nvlink', 'torch']")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.timeout_s = knobs.peer_timeout_s() if timeout_s is None else float(timeout_s)
        self._low_latency = None
        if low_latency_mode:
            from .low_latency import LowLatencyBuffer

            self._low_latency = LowLatencyBuffer(group, num_bytes=self.num_rdma_bytes or self.num_nvl_bytes,
                                                 timeout_s=self.timeout_s)
            if not self.num_rdma_bytes:
                self.num_nvl_bytes = 0  # the low-latency buffer took these bytes
        # the NVLink backend only sets up over the group (any backend); the portable one runs its
        # collectives on the comm stream, so it needs a group that runs on CUDA (NCCL)
        on_cuda = torch.cuda.is_available() and (self._group_on_cuda() or backend == "nvlink")
        self._comm_stream = torch.cuda.Stream() if on_cuda else None
        self._backend = self._make_backend(backend)

    def _group_on_cuda(self) -> bool:
        try:
            return dist.get_backend(self.group) in ("nccl", "cuda:nccl") or "nccl" in str(dist.get_backend(self.group))
        except Exception:
            return False

    def _make_backend(self, backend: str):
        use_nvlink = backend == "nvlink"
        if backend == "auto":
            use_nvlink = (self._comm_stream is not None and self.num_nvl_bytes > 0 and self.group_size <= ik.MAX_RANKS
                          and _peer_access_everywhere(self.group, torch.cuda.current_device()))
        if use_nvlink:
            if self._comm_stream is None:
                raise ValueError("backend='nvlink' needs CUDA")
            from .normal.nvlink import NvlinkBackend

            return NvlinkBackend(self.group, self.rank, self.group_size, self.num_nvl_bytes, self.timeout_s)
        return TorchBackend(self.group, self.rank, self.group_size)

    @property
    def backend(self) -> str:
        return self._backend.name

    # -- DeepEP static helpers -----------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        check_positive_int("new_num_sms", new_num_sms)
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream, to pass as previous_event."""
        if not torch.cuda.is_available():
            return _DoneEvent()
        return EventOverlap.record()

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        chunks = {2: (24, 256), 4: (6, 256), 8: (6, 256)}.get(num_ranks, (6, 256))
        return tuning.config_for("dispatch", num_ranks) or Config(Buffer.num_sms, *chunks, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        chunks = {2: (10, 256), 4: (9, 256), 8: (4, 256)}.get(num_ranks, (4, 256))
        return tuning.config_for("combine", num_ranks) or Config(Buffer.num_sms, *chunks, 6, 128)

    @staticmethod
    def get_low_latency_rdma_size_hint(*args, **kwargs) -> int:
        from .low_latency import get_low_latency_rdma_size_hint

        return get_low_latency_rdma_size_hint(*args, **kwargs)

    def get_comm_stream(self):
        return self._comm_stream

    # -- stream and event plumbing (DeepEP's) --------------------------------------------------------
    def _run(self, fn, inputs: tuple, previous_event, async_finish: bool, allocate_on_comm_stream: bool):
        """Run fn on the communication stream with DeepEP's ordering; returns (fn's result, event)."""
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as in DeepEP)")
        if self._comm_stream is None:
            result = fn()
            return result, (_DoneEvent() if async_finish else EventOverlap(None))
        compute = torch.cuda.current_stream()
        comm = self._comm_stream
        if previous_event is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            result = fn()
        outputs = tuple(t for t in _tensors(result))
        # tensors made on the comm stream are used on the compute stream, and the reverse
        for t in outputs:
            t.record_stream(compute)
        if async_finish:
            for t in _tensors(inputs):
                t.record_stream(comm)
            return result, EventOverlap.record(comm, extra_tensors=tuple(_tensors(inputs)) + outputs)
        compute.wait_stream(comm)
        return result, EventOverlap(None)

    # -- layout ---------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """(num_tokens_per_rank [R], None, num_tokens_per_expert [E], is_token_in_rank [T, R], event)."""
        self._check_usable()
        (per_rank, per_expert, in_rank), event = self._run(
            lambda: _layout(topk_idx, num_experts, self.group_size), (topk_idx,), previous_event, async_finish,
            allocate_on_comm_stream)
        return per_rank, None, per_expert, in_rank, event

    # -- dispatch -------------------------------------------------------------------------------------
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Config | None = None,
                 previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Send each token to every rank holding one of its experts.

        Returns (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event);
        recv_x is (fp8, scales) for FP8 input. Cached mode (handle given) returns (recv_x, None, None, None,
        None, event)."""
        self._check_usable()
        config = config or self.get_dispatch_config(self.group_size)
        x_data, x_scales = self._check_x(x)
        args = self._check_dispatch(x_data, x_scales, handle, num_tokens_per_rank, is_token_in_rank,
                                    num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens)
        inputs = tuple(t for t in (x_data, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                                   num_tokens_per_expert) if t is not None)
        result, event = self._run(lambda: self._backend.dispatch(config=config, **args), inputs, previous_event,
                                  async_finish, allocate_on_comm_stream)
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, new_handle = result
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        if handle is not None:
            return recv, None, None, None, None, event
        return recv, recv_topk_idx, recv_topk_weights, per_expert_list, new_handle, event

    def _check_x(self, x):
        if isinstance(x, tuple):
            if len(x) != 2:
                raise ValueError("x: an FP8 input is the tuple (fp8 [T, H], scales [T, H / 128])")
            data, scales = x
            check_tensor("x[0]", data, dtype=torch.float8_e4m3fn, ndim=2)
            if data.shape[1] % 128:
                raise ValueError(f"x[0]: FP8 hidden size {data.shape[1]} must be a multiple of 128")
            check_tensor("x[1]", scales, dtype=torch.float32, ndim=2, shape=(data.shape[0], data.shape[1] // 128),
                         device=data.device)
            return data, scales
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2)
        if x.shape[1] % 8:
            raise ValueError(f"x: hidden size {x.shape[1]} must be a multiple of 8")
        return x, None

    def _check_dispatch(self, x, x_scales, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                        topk_idx, topk_weights, expert_alignment, num_worst_tokens) -> dict:
        R, T, device = self.group_size, x.shape[0], x.device
        check_positive_int("expert_alignment", expert_alignment)
        check_positive_int("num_worst_tokens", num_worst_tokens, lo=0)
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("dispatch: cached mode (handle given) takes no topk_idx / topk_weights")
            handle = check_handle(handle, R)
            if handle.num_tokens != T:
                raise ValueError(f"x: {T} tokens, but the handle was made for {handle.num_tokens}")
        else:
            for name, t in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
                if t is None:
                    raise ValueError(f"dispatch: {name} is required without a handle (see get_dispatch_layout)")
            check_tensor("num_tokens_per_rank", num_tokens_per_rank, dtype=torch.int32, ndim=1, shape=(R,), device=device)
            check_tensor("is_token_in_rank", is_token_in_rank, dtype=torch.bool, ndim=2, shape=(T, R), device=device)
            check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtype=torch.int32, ndim=1, device=device)
            num_experts = num_tokens_per_expert.numel()
            if num_experts == 0 or num_experts % R:
                raise ValueError(f"num_tokens_per_expert: {num_experts} experts, must be a positive multiple of {R} ranks")
            if (topk_idx is None) != (topk_weights is None):
                raise ValueError("dispatch: pass topk_idx and topk_weights together")
            if topk_idx is not None:
                check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2, device=device)
                if topk_idx.shape[0] != T or not 1 <= topk_idx.shape[1] <= ik.MAX_TOPK:
                    raise ValueError(f"topk_idx: shape {tuple(topk_idx.shape)}, expected ({T}, 1..{ik.MAX_TOPK})")
                check_tensor("topk_weights", topk_weights, dtype=torch.float32, ndim=2, shape=tuple(topk_idx.shape),
                             device=device)
                check_range("topk_idx", topk_idx, -1, num_experts)
        return dict(x=x, x_scales=x_scales, topk_idx=topk_idx, topk_weights=topk_weights,
                    num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                    num_tokens_per_expert=num_tokens_per_expert, expert_alignment=expert_alignment,
                    num_worst_tokens=num_worst_tokens, handle=handle)

    # -- combine --------------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle, topk_weights=None, bias=None, config: Config | None = None,
                previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Sum, for every original token, the rows returned by each rank it was sent to.

        Returns (combined_x [T, H], combined_topk_weights [T, K] or None, event)."""
        self._check_usable()
        config = config or self.get_combine_config(self.group_size)
        handle = check_handle(handle, self.group_size)
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2, shape=(handle.num_recv_rows, None))
        if x.shape[1] % 8:
            raise ValueError(f"x: hidden size {x.shape[1]} must be a multiple of 8")
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtype=torch.float32, ndim=2, shape=(x.shape[0], None),
                         device=x.device)
            if not 1 <= topk_weights.shape[1] <= ik.MAX_TOPK:
                raise ValueError(f"topk_weights: {topk_weights.shape[1]} columns, expected 1..{ik.MAX_TOPK}")
        biases = () if bias is None else (bias if isinstance(bias, tuple) else (bias,))
        if len(biases) > 2:
            raise ValueError("bias: at most two tensors")
        for i, b in enumerate(biases):
            check_tensor(f"bias[{i}]", b, dtype=torch.bfloat16, ndim=2, shape=(handle.num_tokens, x.shape[1]),
                         device=x.device)
        inputs = (x,) + ((topk_weights,) if topk_weights is not None else ()) + biases
        (combined_x, combined_weights), event = self._run(
            lambda: self._backend.combine(x=x, handle=handle, topk_weights=topk_weights, bias=biases, config=config),
            inputs, previous_event, async_finish, allocate_on_comm_stream)
        return combined_x, combined_weights, event

    # -- lifetime -------------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._backend is None:
            raise RuntimeError("this Buffer was destroyed")
        check = getattr(self._backend, "raise_if_failed", None)
        if check is not None:
            check()

    def destroy(self) -> None:
        """Free the peer buffers (every rank must call it; also done at exit)."""
        if self._backend is not None:
            self._backend.destroy()
            self._backend = None
        if self._low_latency is not None:
            destroy = getattr(self._low_latency, "destroy", None)
            if destroy is not None:
                destroy()
            self._low_latency = None

    # -- low-latency mode: delegated to epkern.low_latency ---------------------------------------------
    def _ll(self, name: str):
        if self._low_latency is None:
            raise RuntimeError(f"Buffer.{name}: construct the buffer with low_latency_mode=True")
        return getattr(self._low_latency, name)

    def low_latency_dispatch(self, *args, **kwargs):
        return self._ll("low_latency_dispatch")(*args, **kwargs)

    def low_latency_combine(self, *args, **kwargs):
        return self._ll("low_latency_combine")(*args, **kwargs)

    def get_next_low_latency_combine_buffer(self, *args, **kwargs):
        return self._ll("get_next_low_latency_combine_buffer")(*args, **kwargs)

    def clean_low_latency_buffer(self, *args, **kwargs):
        return self._ll("clean_low_latency_buffer")(*args, **kwargs)

    def low_latency_update_mask_buffer(self, *args, **kwargs):
        return self._ll("low_latency_update_mask_buffer")(*args, **kwargs)

    def low_latency_query_mask_buffer(self, *args, **kwargs):
        return self._ll("low_latency_query_mask_buffer")(*args, **kwargs)

    def low_latency_clean_mask_buffer(self, *args, **kwargs):
        return self._ll("low_latency_clean_mask_buffer")(*args, **kwargs)


def _tensors(obj):
    """Every tensor inside nested tuples/lists (handles included)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
