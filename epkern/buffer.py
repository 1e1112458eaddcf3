"""epkern.Buffer: a drop-in for deep_ep.Buffer (normal mode here; low-latency mode delegated).

    buffer = epkern.Buffer(group, num_nvl_bytes=int(1e9))          # backend="auto"|"nvlink"|"torch"
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk_idx, topk_weights=topk_weights)
    combined_x, combined_topk_weights, event = buffer.combine(expert_out, handle, topk_weights=recv_topk_weights)

Semantics follow DeepEP's V1 Buffer (v1.2.1; tests/data/deep_ep_v1_2_1_signatures.json holds its
public signatures and tests/test_deep_ep_signatures.py checks ours against them): received rows are
ordered by source rank, then token index; recv_topk_idx holds local expert ids and -1 for experts
elsewhere; counts are rounded up to expert_alignment; passing `handle` back repeats a layout;
num_worst_tokens pads outputs and skips the host sync. x is any dtype whose row is a multiple of 16
bytes, or (1-byte rows, fp32 or int32 scales of any strides) (see epkern.normal.payload). Work runs
on a dedicated communication stream: it waits for `previous_event` (or the current stream); with
async_finish the returned EventOverlap tracks it, otherwise the current stream waits for it before
the call returns. A synchronous call (no event, no async_finish) from the stream the previous
synchronous call returned on launches there instead: the same order without the two stream waits
(Buffer._launch). A synchronous get_dispatch_layout runs on the current stream (no peer memory).

Backends (the NormalBackend protocol below): "nvlink" (CUDA-IPC peer buffers, JIT kernels; all
ranks on one node), "torch" (all_to_all_single; any process group, CPU/gloo included), "auto":
NVLink when CUDA is present, num_nvl_bytes > 0 and every rank's GPU can map every other's
(whatever the group's backend: vLLM builds its Buffer over a gloo CPU group; the group only sets
the peer buffers up), else torch.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from epkern.codegen.knobs import raw_env
from epkern.codegen.launch import current_stream_handle

from .call_plans import signature, store
from .events import EventHandle, EventOverlap, cuda_event
from . import tuning
from .layout import get_dispatch_layout as _layout
from .normal import kernels as ik
from .normal import payload, plans
from .internode import HierarchicalTorchBackend, NodeTopology, detect_topology
from .normal.handle import check_handle
from .normal.torch_backend import TorchBackend
from .validate import check_positive_int, check_range, check_tensor

topk_idx_t = torch.int64  # DeepEP's dtype of topk_idx (deep_ep.topk_idx_t)

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
        """Peer-buffer bytes that take num_max_tokens tokens per rank in one round, with rows of
        hidden_bytes (hidden x max(element size, 2), as DeepEP users compute it). Any number of
        tokens works with it: what does not fit at once streams through the buffer in rounds
        (epkern/normal/rounds.py); DeepEP's two-argument call sizes it for 4,096 tokens per rank."""
        hidden = -(-hidden_bytes // 2)
        slot = max(ik.combine_slot_bytes(hidden, num_topk),
                   ik.dispatch_slot_bytes(-(-hidden // 8) * 8, num_topk, False))
        return max(ik.MIN_PEER_BYTES, ik.required_bytes(num_max_tokens * num_ranks, slot))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0  # intranode only: no RDMA buffer

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, nvl_send={self.num_max_nvl_chunked_send_tokens}, "
                f"nvl_recv={self.num_max_nvl_chunked_recv_tokens})")


@runtime_checkable
class NormalBackend(Protocol):
    """What Buffer needs from a normal-mode backend (epkern.normal.nvlink.NvlinkBackend and
    epkern.normal.torch_backend.TorchBackend implement it).

    dispatch returns (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle);
    combine returns (combined_x, combined_topk_weights). Both run on the current stream. Payloads:
    with carries_any_row the backend takes every input check_x accepts as it is; otherwise it takes
    bf16 rows, or fp8 rows with fp32 [T, H/128] contiguous scales, and Buffer fits the input to
    those (epkern.normal.payload). `peer` is the backend's peer buffer, or None if it has none.
    Optional, False when absent: `stream_calls = True` says cached dispatch and combine take stream=
    (a raw handle to launch on) and do nothing but allocate outputs (on the current stream) and launch
    kernels, so Buffer orders them itself (Buffer._launch).
    """

    name: str
    carries_any_row: bool
    peer: object

    def dispatch(self, *, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, expert_alignment: int, num_worst_tokens: int, handle, config) -> tuple: ...

    def combine(self, *, x, handle, topk_weights, bias, config) -> tuple: ...

    def raise_if_failed(self) -> None: ...

    def destroy(self) -> None: ...


class NotInEpkern(NotImplementedError, AttributeError):
    """A DeepEP attribute epkern does not provide (an AttributeError too, so getattr(obj, name, None) works)."""


def _payload_key(x):
    """A dispatch payload's signature (signature of x, or of both halves of an (x, scales) tuple)."""
    if type(x) is tuple:
        return (signature(x[0]), signature(x[1])) if len(x) == 2 else None
    return signature(x)


def _biases(bias) -> tuple:
    return () if bias is None else (bias if isinstance(bias, tuple) else (bias,))


def _bias_key(bias):
    if bias is None or not isinstance(bias, tuple):
        return signature(bias)
    return tuple(signature(b) for b in bias)


def _single_node(what: str) -> RuntimeError:
    return RuntimeError(f"Buffer.{what}: this group is on one node; call Buffer.{what.replace('internode_', '')} "
                        "(DeepEP's dispatch/combine route to the internode path only when the group spans nodes)")


class Buffer:
    """DeepEP's Buffer API for intranode expert parallelism (see the module docstring).

    Arguments after DeepEP's (keyword only): backend ("auto" | "nvlink" | "torch"), timeout_s (how
    long a kernel waits for a peer before it reports the rank), low_latency_num_sms (SMs of the
    low-latency kernels; default: all of the GPU's), use_fabric and enable_shrink (DeepEP main's
    arguments; accepted, nothing to switch here)."""

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, comm=None, *,
                 use_fabric: bool = False, enable_shrink: bool = False, backend: str = "auto",
                 timeout_s: float | None = None, low_latency_num_sms: int | None = None) -> None:
        from epkern.codegen import knobs

        if backend not in ("auto", "nvlink", "torch"):
            raise ValueError(f"backend={backend!r}: allowed values are ['auto', 'nvlink', 'torch']")
        if group is None:
            if comm is not None:
                raise NotImplementedError("Buffer(group=None, comm=...): an mpi4py communicator is not supported; "
                                          "pass a torch.distributed process group")
            raise ValueError("Buffer: either 'group' or 'comm' must be provided")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            check_positive_int(name, value, lo=0)
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.timeout_s = knobs.peer_timeout_s() if timeout_s is None else knobs.check_timeout_s("timeout_s", timeout_s)
        self._local_bytes: torch.Tensor | None = None
        self._low_latency = None
        self._configs: dict = {}
        self._dispatch_plans: dict = {}   # cached dispatch and combine per signature (epkern/normal/plans.py)
        self._combine_plans: dict = {}
        # which ranks share a node decides both modes' engines (a collective: once, before either)
        topology = detect_topology(self.group) if self.group_size > 1 else NodeTopology(1, 1)
        if low_latency_mode:
            from .low_latency import make_low_latency_buffer

            self._low_latency = make_low_latency_buffer(group, self.num_rdma_bytes or self.num_nvl_bytes,
                                                        self.timeout_s, low_latency_num_sms, topology)
            if not self.num_rdma_bytes:
                self.num_nvl_bytes = 0  # the low-latency buffer took these bytes
            # the per-step calls go straight to the engine, whose methods take these methods' parameters in
            # the same order (tests/test_buffer_low_latency_calls.py): a forwarding frame of 12 keywords
            # cost ~1.5 us a call
            self.low_latency_dispatch = self._low_latency.low_latency_dispatch
            self.low_latency_combine = self._low_latency.low_latency_combine
        elif low_latency_num_sms is not None:
            raise ValueError("low_latency_num_sms: needs low_latency_mode=True")
        self._backend: NormalBackend | None = self._make_backend(backend, topology)
        # the NVLink kernels and NCCL collectives run on a stream of their own; gloo runs on the host
        on_stream = torch.cuda.is_available() and (self._backend.name == "nvlink" or self._group_on_cuda())
        self._comm_stream = torch.cuda.Stream() if on_stream else None
        # cached dispatch and combine of a backend that only allocates and launches in them: Buffer._launch
        self._stream_calls = getattr(self._backend, "stream_calls", False) and self._comm_stream is not None
        if self._stream_calls:
            from .streams import StreamOrder

            self._device_index = torch.cuda.current_device()
            self._comm_handle = self._comm_stream.cuda_stream
            self._order = StreamOrder(self._device_index)
            # a stream whose new work runs after every communication kernel this buffer issued: the
            # communication stream, or the current stream an eager synchronous call last waited on (the
            # next synchronous call from that stream launches there, without the two stream waits)
            self._comm_tail = self._comm_handle

    def _group_on_cuda(self) -> bool:
        try:
            return "nccl" in str(dist.get_backend(self.group))
        except Exception:
            return False

    def _make_backend(self, backend: str, topology: NodeTopology) -> NormalBackend:
        # a group spanning nodes takes the two-hop backend; inside one node, NVLink or torch
        self.num_nodes = topology.num_nodes
        if topology.num_nodes > 1:
            if backend == "nvlink":
                raise ValueError(f"backend='nvlink': the group spans {topology.num_nodes} nodes "
                                 f"({topology.ranks_per_node} ranks each); NVLink reaches one node")
            made = HierarchicalTorchBackend(self.group, self.rank, self.group_size, topology, self.timeout_s)
        else:
            use_nvlink = backend == "nvlink"
            if backend == "auto":
                use_nvlink = (torch.cuda.is_available() and self.num_nvl_bytes > 0
                              and self.group_size <= ik.MAX_RANKS
                              and _peer_access_everywhere(self.group, torch.cuda.current_device()))
            if use_nvlink:
                if not torch.cuda.is_available():
                    raise ValueError("backend='nvlink' needs CUDA")
                from .normal.nvlink import NvlinkBackend

                made = NvlinkBackend(self.group, self.rank, self.group_size, self.num_nvl_bytes, self.timeout_s)
            else:
                made = TorchBackend(self.group, self.rank, self.group_size, self.timeout_s)
        if not isinstance(made, NormalBackend):
            raise TypeError(f"{type(made).__name__} does not implement the NormalBackend protocol")
        return made

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def runtime(self):
        """DeepEP's C++ runtime object: epkern has none (raises NotImplementedError, which is also an
        AttributeError so `getattr(buffer, "runtime", None)` gives None)."""
        raise NotInEpkern("Buffer.runtime: DeepEP's C++ runtime (deep_ep_cpp.Buffer) has no epkern equivalent; "
                          "use the Buffer's own methods (get_local_buffer_tensor, get_comm_stream, ...)")

    # -- DeepEP static helpers -----------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SMs of the normal-mode kernels (every Buffer; DeepEP's: an even number)."""
        check_positive_int("new_num_sms", new_num_sms)
        if new_num_sms % 2:
            raise ValueError(f"new_num_sms={new_num_sms}: the SM count must be even (as in DeepEP)")
        Buffer.num_sms = new_num_sms

    def set_low_latency_num_sms(self, num_sms: int) -> None:
        """SMs of this buffer's low-latency kernels (clamped to the GPU's SM count; an epkern extension)."""
        check_positive_int("num_sms", num_sms)
        ll = self._ll("set_low_latency_num_sms")
        if ll.peer is None:   # the collective path (across nodes): NCCL's kernel picks its own SMs
            ll.num_sms = num_sms
            return
        ll.num_sms = min(num_sms, torch.cuda.get_device_properties(ll.device).multi_processor_count)

    @property
    def low_latency_num_sms(self) -> int:
        return self._ll("low_latency_num_sms").num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream, to pass as previous_event."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        chunks = {2: (24, 256), 4: (6, 256), 8: (6, 256)}.get(num_ranks, (6, 256))
        return tuning.config_for("dispatch", num_ranks) or Config(Buffer.num_sms, *chunks, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        chunks = {2: (10, 256), 4: (9, 256), 8: (4, 256)}.get(num_ranks, (4, 256))
        return tuning.config_for("combine", num_ranks) or Config(Buffer.num_sms, *chunks, 6, 128)

    def _default_config(self, kernel: str) -> Config:
        """The config a call without one uses: get_*_config's, kept per Buffer.num_sms while no
        EPKERN_TUNED_CONFIG is set (only read here; the public getters return a fresh Config each time)."""
        tuned = raw_env("EPKERN_TUNED_CONFIG")
        key = (kernel, Buffer.num_sms)
        config = None if tuned else self._configs.get(key)  # a tuned file: tuning's own cache follows its edits
        if config is None:
            getter = self.get_dispatch_config if kernel == "dispatch" else self.get_combine_config
            config = getter(self.group_size)
            if not tuned:
                self._configs[key] = config
        return config

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        from .low_latency import get_low_latency_rdma_size_hint

        return get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        """The communication stream (None when the calls run on the host: the torch backend over gloo)."""
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: torch.Size | None = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """This rank's communication buffer as a 1-D tensor of dtype from byte `offset` on (as DeepEP's),
        or its first size.numel() elements viewed as `size`. use_rdma_buffer=True: the low-latency
        buffer (epkern's takes the place of DeepEP's RDMA buffer); False: the normal-mode buffer (the
        NVLink peer buffer; the torch backend, which needs none, keeps a private one of num_nvl_bytes)."""
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
        check_positive_int("offset", offset, lo=0)
        raw = self._local_bytes_view(use_rdma_buffer)
        if offset > raw.numel():
            raise ValueError(f"offset={offset}: beyond the {raw.numel()}-byte buffer")
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (raw.numel() - offset) // itemsize
        tensor = raw[offset:offset + count * itemsize].view(dtype)
        if size is None:
            return tensor
        size = torch.Size(size)
        if size.numel() > tensor.numel():
            raise ValueError(f"size={tuple(size)}: {size.numel()} elements, the buffer holds {tensor.numel()} "
                             f"of {dtype} from offset {offset}")
        return tensor[:size.numel()].view(size)

    def _local_bytes_view(self, use_rdma_buffer: bool) -> torch.Tensor:
        self._check_usable()
        if use_rdma_buffer:
            if self._low_latency is None:
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
                return torch.empty(0, dtype=torch.uint8, device=device)  # DeepEP: no RDMA buffer, 0 elements
            peer = self._low_latency.peer
            if peer is None:   # the collective path: a private buffer
                return self._low_latency.local_buffer()
            return peer.view(peer.rank, 0, (peer.nbytes,), torch.uint8)
        peer = self._backend.peer
        if peer is not None:
            return peer.view(peer.rank, 0, (peer.nbytes,), torch.uint8)
        if self._local_bytes is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            self._local_bytes = torch.zeros(self.num_nvl_bytes, dtype=torch.uint8, device=device)
        return self._local_bytes

    # -- stream and event plumbing (DeepEP's) --------------------------------------------------------
    def _run(self, fn, inputs: tuple, previous_event, async_finish: bool, allocate_on_comm_stream: bool):
        """Run fn on the communication stream with DeepEP's ordering; returns (fn's result, event).

        fn() runs with the communication stream current: its allocations and torch ops are made there
        (tensors used on the other stream are recorded on it)."""
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as in DeepEP)")
        if self._comm_stream is None:   # host-side collectives: done when fn returns
            result = fn()
            return result, (EventOverlap(EventHandle()) if async_finish else EventOverlap(None))
        compute = torch.cuda.current_stream()
        comm = self._comm_stream
        if self._stream_calls:
            self._order_after_tail(compute.cuda_stream, previous_event is None)
        waited = cuda_event(previous_event.event) if previous_event is not None else None
        if waited is not None:
            comm.wait_event(waited)
        else:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            result = fn()
        outputs = tuple(t for t in _tensors(result) if t.is_cuda)
        # tensors made on the comm stream are used on the compute stream, and the reverse
        for t in outputs:
            t.record_stream(compute)
        if async_finish:
            cuda_inputs = tuple(t for t in _tensors(inputs) if t.is_cuda)
            for t in cuda_inputs:
                t.record_stream(comm)
            return result, EventOverlap.record(comm, extra_tensors=cuda_inputs + outputs)
        compute.wait_stream(comm)
        if self._stream_calls:
            self._tail_after_wait(compute.cuda_stream)
        return result, EventOverlap(None)

    def _launch(self, fn, inputs: tuple, previous_event, async_finish: bool, allocate_on_comm_stream: bool):
        """_run for calls that only allocate outputs and launch kernels (a backend with stream_calls):
        DeepEP's order by raw stream handles (epkern.streams). fn(stream) launches on the raw
        communication stream and allocates on the current stream (on the communication stream with
        allocate_on_comm_stream), as DeepEP does; with async_finish every input and output is
        recorded on the communication stream (and outputs made there on the current one). A
        synchronous call from the tail stream (self._comm_tail) launches on it, with no wait."""
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as in DeepEP)")
        compute = current_stream_handle(self._device_index)
        if compute == self._comm_tail and previous_event is None and not async_finish:
            # everything earlier is ordered before this stream's new work: DeepEP's wait, launch on the
            # communication stream and wait back would order this call exactly as launching here does
            return fn(compute), EventOverlap(None)
        order, comm = self._order, self._comm_handle
        self._order_after_tail(compute, previous_event is None)
        if previous_event is not None:
            order.wait_event(comm, cuda_event(previous_event.event))
        else:
            order.wait(comm, compute)
        if not allocate_on_comm_stream:
            result = fn(comm)
        else:
            with torch.cuda.stream(self._comm_stream):
                result = fn(comm)
        if not async_finish:
            order.wait(compute, comm)
            self._tail_after_wait(compute)
            return result, EventOverlap(None)
        outputs = tuple(t for t in _tensors(result) if t.is_cuda)
        cuda_inputs = tuple(t for t in _tensors(inputs) if t.is_cuda)
        current = torch.cuda.current_stream()
        for t in cuda_inputs + outputs:
            t.record_stream(self._comm_stream)
        if allocate_on_comm_stream:
            for t in outputs:
                t.record_stream(current)
        return result, EventOverlap.record(self._comm_stream, extra_tensors=cuda_inputs + outputs)

    def _order_after_tail(self, compute: int, waits_on_compute: bool) -> None:
        """Before a launch on the communication stream: order it after the stream a synchronous call last
        launched on directly, unless the call's own wait on the current stream does. Enqueued before that
        wait, so that during a capture it is an eager wait (the tail is never a capturing stream)."""
        tail = self._comm_tail
        if tail != self._comm_handle and not (waits_on_compute and tail == compute):
            self._order.wait(self._comm_handle, tail)
        self._comm_tail = self._comm_handle

    def _tail_after_wait(self, compute: int) -> None:
        """After the current stream waited for the communication stream: it is the tail now, unless it is
        capturing (its new work would go into the graph, not after the eager kernels)."""
        if not self._order.is_capturing(compute):
            self._comm_tail = compute

    # -- layout ---------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """(num_tokens_per_rank [R], num_tokens_per_rdma_rank [nodes] or None on one node,
        num_tokens_per_expert [E], is_token_in_rank [T, R], event)."""
        self._check_usable()

        def layout():
            per_rank, per_expert, in_rank = _layout(topk_idx, num_experts, self.group_size)
            per_node = None
            if self.num_nodes > 1:
                per_node = in_rank.view(in_rank.shape[0], self.num_nodes, -1).any(2).sum(0, dtype=torch.int32)
            return per_rank, per_node, per_expert, in_rank

        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            # a local kernel (no peer memory): on the current stream it is ordered exactly as DeepEP's wait,
            # launch on the communication stream and wait back order it, without the two waits
            return layout() + (EventOverlap(None),)
        (per_rank, per_node, per_expert, in_rank), event = self._run(layout, (topk_idx,), previous_event,
                                                                     async_finish, allocate_on_comm_stream)
        return per_rank, per_node, per_expert, in_rank, event

    # -- dispatch -------------------------------------------------------------------------------------
    def dispatch(self, x, handle: tuple | None = None, num_tokens_per_rank: torch.Tensor | None = None,
                 num_tokens_per_rdma_rank: torch.Tensor | None = None, is_token_in_rank: torch.Tensor | None = None,
                 num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event: EventOverlap | None = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Send each token to every rank holding one of its experts.

        x: [T, H] of any dtype whose row is a multiple of 16 bytes, or (x [T, H] of a 1-byte dtype,
        scales [T, S] fp32 or int32, any strides). Returns (recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event); recv_x has x's form (a tuple with contiguous
        scales for a tuple). Cached mode (handle given) returns (recv_x, None, None, None, None, event)."""
        self._check_usable()
        config = config or self._default_config("dispatch")
        key = plan = None
        if handle is not None and self._stream_calls:
            try:  # a cached dispatch of a signature seen before: its checks passed, only the pointers are new
                key = (_payload_key(x), plans.handle_key(handle), config.num_sms, expert_alignment,
                       type(expert_alignment), num_worst_tokens, type(num_worst_tokens),
                       topk_idx is None and topk_weights is None)
                plan = self._dispatch_plans.get(key)
            except (AttributeError, TypeError):  # not tensors, unhashable: the checks below say what
                key = None
        if plan is None:
            x_data, x_scales = payload.check_x(x)
            args = self._check_dispatch(x_data, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                                        topk_idx, topk_weights, expert_alignment, num_worst_tokens)
            if key is not None and None not in key[:2] and plans.CachedDispatchPlan.takes(x_data, x_scales):
                plan = plans.CachedDispatchPlan(self._backend, x_data, x_scales, args["handle"], config.num_sms)
                store(self._dispatch_plans, key, plan, plans.PLAN_LIMIT)
        if plan is not None:
            x_data, x_scales = x if type(x) is tuple else (x, None)
            (recv_x, recv_scales), event = self._launch(
                lambda stream: plan(stream, x_data, x_scales, handle),
                (x_data,) if x_scales is None else (x_data, x_scales), previous_event, async_finish,
                allocate_on_comm_stream)
            return (recv_x, recv_scales) if x_scales is not None else recv_x, None, None, None, None, event
        inputs = tuple(t for t in (x_data, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                                   num_tokens_per_expert) if t is not None)
        if handle is not None and self._stream_calls:
            # cached: outputs and kernels only, ordered by raw handles (the input is fitted first, here)
            sent = payload.for_nvlink(x_data, x_scales)
            result, event = self._launch(
                lambda stream: self._backend.dispatch(x=sent.x, x_scales=sent.scales, config=config, stream=stream,
                                                      **args),
                inputs + (sent.x, sent.scales), previous_event, async_finish, allocate_on_comm_stream)
            recv_x, recv_scales = sent.restore(result[0], result[1])
            return (recv_x, recv_scales) if x_scales is not None else recv_x, None, None, None, None, event

        def launch():
            if self._backend.carries_any_row:
                return self._backend.dispatch(x=x_data, x_scales=x_scales, config=config, **args)
            sent = payload.for_nvlink(x_data, x_scales)
            out = self._backend.dispatch(x=sent.x, x_scales=sent.scales, config=config, **args)
            return sent.restore(out[0], out[1]) + tuple(out[2:])

        result, event = self._run(launch, inputs, previous_event, async_finish, allocate_on_comm_stream)
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, new_handle = result
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        if handle is not None:
            return recv, None, None, None, None, event
        return recv, recv_topk_idx, recv_topk_weights, per_expert_list, new_handle, event

    def _check_dispatch(self, x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                        topk_idx, topk_weights, expert_alignment, num_worst_tokens) -> dict:
        R, T, device = self.group_size, x.shape[0], x.device
        check_positive_int("expert_alignment", expert_alignment)
        check_positive_int("num_worst_tokens", num_worst_tokens, lo=0)
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("dispatch: cached mode (handle given) takes no topk_idx / topk_weights")
            handle = self._check_handle(handle)
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
        return dict(topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
                    is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                    expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, handle=handle)

    # -- combine --------------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: torch.Tensor | None = None,
                bias: torch.Tensor | tuple | None = None, config: Config | None = None,
                previous_event: EventOverlap | None = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Sum, for every original token, the rows returned by each rank it was sent to.

        Returns (combined_x [T, H], combined_topk_weights [T, K] or None, event)."""
        self._check_usable()
        config = config or self._default_config("combine")
        key = plan = None
        if self._stream_calls:
            try:  # a signature seen before: its checks passed, only the pointers are new
                key = (signature(x), plans.handle_key(handle), signature(topk_weights),
                       _bias_key(bias), config.num_sms)
                plan = self._combine_plans.get(key)
            except (AttributeError, TypeError):  # not tensors, unhashable: the checks below say what
                key = None
        if plan is not None:
            return self._run_combine_plan(plan, x, handle, topk_weights, _biases(bias), previous_event,
                                          async_finish, allocate_on_comm_stream)
        handle = self._check_handle(handle)
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2, shape=(handle.num_recv_rows, None))
        if x.shape[1] % 8:
            raise ValueError(f"x: hidden size {x.shape[1]} must be a multiple of 8")
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtype=torch.float32, ndim=2, shape=(x.shape[0], None),
                         device=x.device)
            if not 1 <= topk_weights.shape[1] <= ik.MAX_TOPK:
                raise ValueError(f"topk_weights: {topk_weights.shape[1]} columns, expected 1..{ik.MAX_TOPK}")
        biases = _biases(bias)
        if len(biases) > 2:
            raise ValueError("bias: at most two tensors")
        for i, b in enumerate(biases):
            check_tensor(f"bias[{i}]", b, dtype=torch.bfloat16, ndim=2, shape=(handle.num_tokens, x.shape[1]),
                         device=x.device)
        if key is not None and key[1] is not None and handle.max_tokens is not None:
            plan = plans.CombinePlan(self._backend, x, handle, topk_weights, biases, config.num_sms)
            store(self._combine_plans, key, plan, plans.PLAN_LIMIT)
            return self._run_combine_plan(plan, x, handle, topk_weights, biases, previous_event, async_finish,
                                          allocate_on_comm_stream)
        inputs = (x,) + ((topk_weights,) if topk_weights is not None else ()) + biases
        if self._stream_calls:
            (combined_x, combined_weights), event = self._launch(
                lambda stream: self._backend.combine(x=x, handle=handle, topk_weights=topk_weights, bias=biases,
                                                     config=config, stream=stream),
                inputs, previous_event, async_finish, allocate_on_comm_stream)
            return combined_x, combined_weights, event
        (combined_x, combined_weights), event = self._run(
            lambda: self._backend.combine(x=x, handle=handle, topk_weights=topk_weights, bias=biases, config=config),
            inputs, previous_event, async_finish, allocate_on_comm_stream)
        return combined_x, combined_weights, event

    def _run_combine_plan(self, plan, x, handle, topk_weights, biases: tuple, previous_event, async_finish: bool,
                          allocate_on_comm_stream: bool):
        inputs = (x,) + ((topk_weights,) if topk_weights is not None else ()) + biases
        (combined_x, combined_weights), event = self._launch(
            lambda stream: plan(stream, x, handle, topk_weights, biases), inputs, previous_event, async_finish,
            allocate_on_comm_stream)
        return combined_x, combined_weights, event

    # -- internode: DeepEP's names for the path dispatch/combine take when the group spans nodes ------
    def internode_dispatch(self, x, handle: tuple | None = None, num_tokens_per_rank: torch.Tensor | None = None,
                           num_tokens_per_rdma_rank: torch.Tensor | None = None,
                           is_token_in_rank: torch.Tensor | None = None,
                           num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
                           topk_weights: torch.Tensor | None = None, expert_alignment: int = 1,
                           config: Config | None = None, previous_event: EventOverlap | None = None,
                           async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Dispatch across nodes (what dispatch does when the group spans nodes; see epkern.internode)."""
        if self.num_nodes == 1:
            raise _single_node("internode_dispatch")
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                             num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, 0, config,
                             previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x: torch.Tensor, handle: tuple, topk_weights: torch.Tensor | None = None,
                          bias: torch.Tensor | tuple | None = None, config: Config | None = None,
                          previous_event: EventOverlap | None = None, async_finish: bool = False,
                          allocate_on_comm_stream: bool = False):
        """Combine across nodes (what combine does when the group spans nodes; see epkern.internode)."""
        if self.num_nodes == 1:
            raise _single_node("internode_combine")
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    def _check_handle(self, handle):
        if isinstance(self._backend, HierarchicalTorchBackend):
            return self._backend.check_handle(handle)
        return check_handle(handle, self.group_size)

    # -- lifetime -------------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._backend is None:
            raise RuntimeError("this Buffer was destroyed")
        self._backend.raise_if_failed()

    def destroy(self) -> None:
        """Free the peer buffers (every rank must call it; also done at exit)."""
        if self._backend is not None:
            self._backend.destroy()
            self._backend = None
        if self._low_latency is not None:
            self._low_latency.destroy()
            self._low_latency = None
            for name in ("low_latency_dispatch", "low_latency_combine"):  # back to the methods that refuse
                self.__dict__.pop(name, None)
        if self._stream_calls:
            self._order.close()
            self._stream_calls = False
        self._local_bytes = None

    # -- low-latency mode: delegated to epkern.low_latency.LowLatencyBuffer ----------------------------
    def _ll(self, name: str):
        if self._low_latency is None:
            raise RuntimeError(f"Buffer.{name}: construct the buffer with low_latency_mode=True")
        return self._low_latency

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        self._ll("clean_low_latency_buffer").clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden,
                                                                       num_experts)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False, topk_weights: torch.Tensor | None = None):
        """DeepEP's low-latency dispatch -> (recv_x, recv_count, handle, event, hook); see LowLatencyBuffer.

        topk_weights (an epkern extension, after DeepEP's parameters): the tokens' [T, K] fp32 weights
        travel with them, so the combine that uses this handle needs no exchange of weights first
        (and may take topk_weights=None). Passed on only when given."""
        extra = {} if topk_weights is None else {"topk_weights": topk_weights}
        return self._ll("low_latency_dispatch").low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats, use_fp8=use_fp8, round_scale=round_scale,
            use_ue8m0=use_ue8m0, async_finish=async_finish, return_recv_hook=return_recv_hook, **extra)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None,
                            handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None):
        """DeepEP's low-latency combine -> (combined_x [T, H], event, hook); see LowLatencyBuffer.
        use_logfmt=True sends the partial rows as DeepEP's 10-bit LogFMT."""
        return self._ll("low_latency_combine").low_latency_combine(
            x, topk_idx, topk_weights, handle, use_logfmt=use_logfmt, zero_copy=zero_copy, async_finish=async_finish,
            return_recv_hook=return_recv_hook, out=out, combine_wait_recv_cost_stats=combine_wait_recv_cost_stats)

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        return self._ll("get_next_low_latency_combine_buffer").get_next_low_latency_combine_buffer(handle)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        self._ll("low_latency_update_mask_buffer").low_latency_update_mask_buffer(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        self._ll("low_latency_query_mask_buffer").low_latency_query_mask_buffer(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        self._ll("low_latency_clean_mask_buffer").low_latency_clean_mask_buffer()


def _peer_access_everywhere(group, device: int) -> bool:
    from .peer_memory import peer_access_everywhere

    return peer_access_everywhere(group, device)


def _tensors(obj):
    """Every tensor inside nested tuples/lists (handles included)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
