"""Low-latency kernels: the specs, the peer-buffer layout, the sizes both sides agree on, the launchers.

One LowLatencySpec per (kind, hidden, ranks, experts, top-k); kind is a dispatch format (bf16, fp8,
fp8_round, fp8_ue8m0; templates/low_latency_dispatch.cu.j2) or a combine row format: "combine" (bf16)
or "combine_logfmt" (LogFMT-10, epkern/low_latency/logfmt.py; templates/low_latency_combine.cu.j2).
A dispatch spec with carry_weights=True also puts the token's top-k weights in every message (K fp32
more in the header, padded to 16 bytes), so that combine exchanges no weights. bf16 rows may be any
multiple of 16 bytes (hidden % 8 == 0); FP8 needs whole 128-channel groups. The device barrier has
its own spec, on the rank count only
(templates/low_latency_barrier.cu.j2). The token count and the maximum tokens per rank M are
run-time kernel arguments: changing them compiles nothing. Every size the templates use (slots,
headers, messages, flag arrays, limits) is computed here and handed to them; each entry point's
argument list is a KernelParams below, checked against its template by tests/test_kernel_params.py.
"""
from __future__ import annotations

import dataclasses

from epkern.codegen import KernelParams, KernelSpec, check_choice, check_int, get_module
from epkern.codegen.launch import current_stream_handle

from . import logfmt

DISPATCH_KINDS = ("bf16", "fp8", "fp8_round", "fp8_ue8m0")
COMBINE_KINDS = ("combine", "combine_logfmt")
KINDS = DISPATCH_KINDS + COMBINE_KINDS
MAX_RANKS = 64
MAX_TOPK = 32
MAX_EXPERTS = 8192
MAX_DISPATCH_TOKENS = 1 << 20  # per rank and call: size hints and buffers beyond it are a mistake (R*M slots fit int32)
ALIGN = 128
BARRIER_OFF, BARRIER_BYTES = 0, 256  # [R] int32 barrier counters at the start of the buffer (never cleaned)
BARRIER_THREADS = 64  # one block; one thread per rank
FLAGS_DISPATCH, FLAGS_COMBINE, FLAGS_WEIGHTS = 0, 1, 2   # the flag arrays of a buffer: [R] 64-bit epoch signals each
NUM_FLAG_ARRAYS = 3


def dispatch_kind(use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> str:
    if not use_fp8:
        if round_scale or use_ue8m0:
            raise ValueError("round_scale / use_ue8m0 need use_fp8=True")
        return "bf16"
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 scales are powers of two)")
    return "fp8_ue8m0" if use_ue8m0 else ("fp8_round" if round_scale else "fp8")


@dataclasses.dataclass(frozen=True)
class LowLatencySpec(KernelSpec):
    family = "low_latency"

    kind: str
    hidden: int
    num_ranks: int
    num_experts: int
    num_topk: int
    threads: int = 512
    carry_weights: bool = False   # dispatch only: the top-k weights travel in the message header

    def validate(self) -> None:
        n = type(self).__name__
        check_choice(n, "kind", self.kind, KINDS)
        # bf16 rows of any multiple of 16 bytes; FP8 casts whole 128-channel groups
        check_int(n, "hidden", self.hidden, 8, 1 << 16, multiple_of=128 if self.use_fp8 else 8)
        if not isinstance(self.carry_weights, bool) or (self.carry_weights and self.is_combine):
            raise ValueError(f"{n}.carry_weights={self.carry_weights!r}: a bool, True for dispatch kinds only "
                             "(combine reads the weights a dispatch carried from the handle)")
        check_int(n, "num_ranks", self.num_ranks, 1, MAX_RANKS)
        check_int(n, "num_experts", self.num_experts, self.num_ranks, MAX_EXPERTS, multiple_of=self.num_ranks)
        check_int(n, "num_topk", self.num_topk, 1, MAX_TOPK)
        check_int(n, "threads", self.threads, max(64, 32 * ((self.num_topk + 31) // 32)), 1024, multiple_of=32)

    @property
    def use_fp8(self) -> bool:
        return self.kind.startswith("fp8")

    @property
    def is_combine(self) -> bool:
        return self.kind in COMBINE_KINDS

    @property
    def template(self) -> str:
        return "low_latency_combine.cu.j2" if self.is_combine else "low_latency_dispatch.cu.j2"

    def template_vars(self):
        v = dict(hidden=self.hidden, num_ranks=self.num_ranks, num_experts=self.num_experts, num_topk=self.num_topk,
                 threads=self.threads, max_ranks=MAX_RANKS, max_topk=MAX_TOPK, slot_bytes=slot_bytes(self.hidden),
                 header_bytes=self.header_bytes, flags_dispatch=FLAGS_DISPATCH, flags_combine=FLAGS_COMBINE,
                 flags_weights=FLAGS_WEIGHTS)
        if self.is_combine:
            v.update(combine_slot_bytes=combine_slot_bytes(self.hidden), logfmt=self.kind == "combine_logfmt",
                     logfmt_meta_bytes=logfmt.meta_bytes(self.hidden))
        else:
            v.update(use_fp8=self.use_fp8, round_scale=self.kind in ("fp8_round", "fp8_ue8m0"),
                     use_ue8m0=self.kind == "fp8_ue8m0", payload_bytes=self.payload_bytes,
                     scale_bytes=self.scale_bytes, message_bytes=self.message_bytes,
                     carry_weights=self.carry_weights)
        return v

    def name_fields(self) -> str:
        return (f"{self.kind}_h{self.hidden}_r{self.num_ranks}_e{self.num_experts}_k{self.num_topk}"
                + ("_w" if self.carry_weights else ""))

    @property
    def header_bytes(self) -> int:
        """Dispatch message header: the token's K expert ids and K slots (int32), then with
        carry_weights its K top-k weights (fp32), padded to 16 bytes."""
        return header_bytes(self.num_topk, self.carry_weights)

    @property
    def payload_bytes(self) -> int:
        """A dispatch message's row: e4m3 bytes or bf16."""
        return self.hidden if self.use_fp8 else 2 * self.hidden

    @property
    def scale_bytes(self) -> int:
        """A dispatch message's fp32 scales (one per 128 channels, FP8 only), padded to 16 bytes."""
        return 16 * -(-(self.hidden // 128) // 4) if self.use_fp8 else 0

    @property
    def message_bytes(self) -> int:
        """Bytes of one dispatch message (one per token and destination rank): header, payload, scales."""
        return self.header_bytes + self.payload_bytes + self.scale_bytes

    @property
    def send_smem(self) -> int:
        """Dynamic shared memory of the dispatch send kernel: the staged message or the expert histogram."""
        staged = self.message_bytes if self.use_fp8 else self.header_bytes
        return max(staged, 4 * self.num_experts)

    @property
    def recv_smem(self) -> int:
        """Dynamic shared memory of the dispatch receive kernel: the first row of each (source, expert)."""
        return 4 * self.num_experts


@dataclasses.dataclass(frozen=True)
class BarrierSpec(KernelSpec):
    """The device barrier of clean_low_latency_buffer: one block of BARRIER_THREADS, any rank count."""

    family = "low_latency_barrier"
    template = "low_latency_barrier.cu.j2"

    num_ranks: int

    def validate(self) -> None:
        check_int(type(self).__name__, "num_ranks", self.num_ranks, 1, min(MAX_RANKS, BARRIER_THREADS))

    def template_vars(self):
        return dict(num_ranks=self.num_ranks, threads=BARRIER_THREADS)

    def name_fields(self) -> str:
        return f"r{self.num_ranks}"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def header_bytes(num_topk: int, carry_weights: bool = False) -> int:
    return 16 * -(-(12 if carry_weights else 8) * num_topk // 16)


def slot_bytes(hidden: int) -> int:
    """One dispatch receive slot: the largest dispatch message (bf16, top-32 header with weights)."""
    return header_bytes(MAX_TOPK, True) + 2 * hidden


def combine_slot_bytes(hidden: int) -> int:
    """One combine receive slot: the largest combine row (LogFMT meta, then every group as bf16)."""
    return logfmt.message_bytes(hidden)


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """Byte offsets inside each rank's peer buffer for (M, hidden, ranks, experts); two buffers alternate.

    [barrier counters][buffer 0][buffer 1]; each buffer is [flags 3 x R uint64][counts E int32]
    [weights R x M x 32 fp32][recv R x M dispatch slots][combine recv R x M combine slots]
    [send L x R*M x H bf16] (the send region is the zero-copy combine source,
    get_next_low_latency_combine_buffer). Combine rows land apart from dispatch messages: a combine
    sent before a slow peer has read our dispatch messages of the same buffer (weights carried: the
    send waits for nobody; two micro-batches: dispatch a, dispatch b, combine a) cannot overwrite
    them, and a dispatch cannot overwrite combine rows of the call before that a peer has not read.
    """

    max_tokens: int
    hidden: int
    num_ranks: int
    num_experts: int

    @property
    def flags_bytes(self) -> int:
        return _align(8 * NUM_FLAG_ARRAYS * self.num_ranks)

    @property
    def counts_bytes(self) -> int:
        return _align(4 * self.num_experts)

    @property
    def weights_bytes(self) -> int:
        return _align(4 * MAX_TOPK * self.num_ranks * self.max_tokens)

    @property
    def recv_bytes(self) -> int:
        return _align(self.num_ranks * self.max_tokens * slot_bytes(self.hidden))

    @property
    def combine_recv_bytes(self) -> int:
        return _align(self.num_ranks * self.max_tokens * combine_slot_bytes(self.hidden))

    @property
    def send_bytes(self) -> int:
        return _align(self.num_experts * self.max_tokens * 2 * self.hidden)

    @property
    def buffer_bytes(self) -> int:
        return (self.flags_bytes + self.counts_bytes + self.weights_bytes + self.recv_bytes + self.combine_recv_bytes
                + self.send_bytes)

    @property
    def total_bytes(self) -> int:
        return BARRIER_BYTES + 2 * self.buffer_bytes

    def flags(self, idx: int) -> int:
        return BARRIER_BYTES + idx * self.buffer_bytes

    def counts(self, idx: int) -> int:
        return self.flags(idx) + self.flags_bytes

    def weights(self, idx: int) -> int:
        return self.counts(idx) + self.counts_bytes

    def recv(self, idx: int) -> int:
        return self.weights(idx) + self.weights_bytes

    def combine_recv(self, idx: int) -> int:
        return self.recv(idx) + self.recv_bytes

    def send(self, idx: int) -> int:
        return self.combine_recv(idx) + self.combine_recv_bytes


def size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of peer buffer per rank that low-latency dispatch/combine need for these shapes."""
    LowLatencySpec("combine", hidden, num_ranks, num_experts, 1)  # validates the shapes
    if isinstance(num_max_dispatch_tokens_per_rank, bool) or not isinstance(num_max_dispatch_tokens_per_rank, int) \
            or not 1 <= num_max_dispatch_tokens_per_rank <= MAX_DISPATCH_TOKENS:
        raise ValueError(f"num_max_dispatch_tokens_per_rank={num_max_dispatch_tokens_per_rank!r}: expected an int "
                         f"in [1, {MAX_DISPATCH_TOKENS}]")
    return BufferLayout(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).total_bytes


def max_tokens_for_bytes(num_bytes: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """The largest M (max dispatch tokens per rank) whose size hint fits num_bytes; 0 if none does."""
    LowLatencySpec("combine", hidden, num_ranks, num_experts, 1)
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
        raise ValueError(f"num_bytes={num_bytes!r}: expected an int >= 0")
    fixed = BufferLayout(0, hidden, num_ranks, num_experts).total_bytes
    # per token and buffer: weights, a dispatch and a combine slot per rank, the send rows; alignment only adds
    per_token = 2 * (num_ranks * (4 * MAX_TOPK + slot_bytes(hidden) + combine_slot_bytes(hidden))
                     + num_experts * 2 * hidden)
    m = min(MAX_DISPATCH_TOKENS, max(0, (num_bytes - fixed) // per_token))
    while m > 0 and BufferLayout(m, hidden, num_ranks, num_experts).total_bytes > num_bytes:
        m -= 1
    return m


def deployment_skips(deployment) -> list[str]:
    """Why deployment_specs builds no low-latency kernel for (part of) a deployment."""
    if deployment.hidden % 128:
        return [f"hidden {deployment.hidden} is not a multiple of 128: no low-latency kernels"]
    if deployment.num_topk > MAX_TOPK:
        return [f"top-{deployment.num_topk} > {MAX_TOPK}: no low-latency kernels"]
    return [f"EP {r}: more than {MAX_RANKS} ranks" for r in deployment.ep_sizes if r > MAX_RANKS]


def deployment_specs(deployment) -> list[KernelSpec]:
    """Every low-latency kernel a deployment needs per EP size: the dispatch formats with and without
    carried weights, both combine row formats, and the barrier.

    bf16 dispatch and combine for any hidden % 8 == 0, FP8 when hidden % 128 == 0; none past 64 ranks
    or top-32 (such a deployment uses the normal mode only)."""
    if deployment.hidden % 8 or deployment.num_topk > MAX_TOPK:
        return []
    kinds = [k for k in DISPATCH_KINDS if deployment.hidden % 128 == 0 or not k.startswith("fp8")]
    specs: list[KernelSpec] = []
    for r in deployment.ep_sizes:
        if r <= MAX_RANKS:
            shape = (deployment.hidden, r, deployment.num_experts, deployment.num_topk)
            specs += [LowLatencySpec(k, *shape, carry_weights=c) for k in kinds for c in (False, True)]
            specs += [LowLatencySpec(k, *shape) for k in COMBINE_KINDS]
            specs.append(BarrierSpec(r))
    return specs


# -- launchers ----------------------------------------------------------------------------------
# Each entry point's parameters, in the order of its template's signature.
DISPATCH_SEND_PARAMS = KernelParams(
    "send", "x topk_idx topk_weights num_tokens:i32 max_tokens:i32 rank:i32 ptr_table flags_off:i64 counts_off:i64 recv_off:i64 "
    "mask epoch_counter send_ticket err err_any")
DISPATCH_RECV_PARAMS = KernelParams(
    "recv", "recv_x recv_scales recv_count src_info layout_range token_rows token_weights recv_tokens "
    "cumulative_stats wait_stats "
    "max_tokens:i32 rank:i32 local_base:u64 flags_off:i64 counts_off:i64 recv_off:i64 mask timeout_ns:u64 "
    "epoch_counter")
DISPATCH_SEND_RECV_PARAMS = KernelParams(
    "send_recv", "x topk_idx topk_weights num_tokens:i32 recv_x recv_scales recv_count src_info layout_range "
    "token_rows token_weights recv_tokens cumulative_stats wait_stats max_tokens:i32 rank:i32 ptr_table flags_off:i64 counts_off:i64 "
    "recv_off:i64 mask timeout_ns:u64 epoch_counter send_ticket err err_any")
COMBINE_SEND_PARAMS = KernelParams(
    "send", "x token_rows recv_tokens topk_weights carried_weights num_tokens:i32 max_tokens:i32 rank:i32 ptr_table flags_off:i64 "
    "weights_off:i64 recv_off:i64 mask timeout_ns:u64 epoch_counter send_ticket")
COMBINE_RECV_PARAMS = KernelParams(
    "recv", "out topk_idx num_tokens:i32 max_tokens:i32 local_base:u64 flags_off:i64 recv_off:i64 mask "
    "timeout_ns:u64 epoch_counter wait_stats")
COMBINE_SEND_RECV_PARAMS = KernelParams(
    "send_recv", "x token_rows recv_tokens topk_weights carried_weights topk_idx out num_tokens:i32 max_tokens:i32 rank:i32 "
    "ptr_table flags_off:i64 weights_off:i64 recv_off:i64 mask timeout_ns:u64 epoch_counter send_ticket wait_stats")
BARRIER_PARAMS = KernelParams("barrier", "ptr_table barrier_off:i64 rank:i32 epoch mask timeout_ns:u64")
PARAMS = {"dispatch": (DISPATCH_SEND_PARAMS, DISPATCH_RECV_PARAMS, DISPATCH_SEND_RECV_PARAMS),
          "combine": (COMBINE_SEND_PARAMS, COMBINE_RECV_PARAMS, COMBINE_SEND_RECV_PARAMS),
          "barrier": (BARRIER_PARAMS,)}


class _PreparedLaunch:
    """A family's launches of one signature: the one send_recv launch, or (with_hook) the send launch
    now and the receive launch as the returned hook; one bound argument list per buffer (0, 1)."""

    __slots__ = ("with_hook", "_send", "_recv", "_send_args", "_recv_args")

    def __call__(self, stream: int, idx: int, inputs: tuple, outputs: tuple):
        """Launch through buffer idx; inputs / outputs: the pointers the family's _INPUTS / _OUTPUTS
        name, in that order. Returns the receive hook (with_hook) or None."""
        if not self.with_hook:
            self._send(stream, *self._send_args[idx](*inputs, *outputs))
            return None
        self._send(stream, *self._send_args[idx](*inputs))
        recv, values = self._recv, self._recv_args[idx](*outputs)

        def hook():
            recv(current_stream_handle(recv.device), *values)
        return hook


class DispatchLaunch(_PreparedLaunch):
    """The launches of one low-latency dispatch signature, prepared once: one send_recv launch of
    num_sms blocks, or (with_hook) the send launch (min(T, num_sms) blocks) and the receive launch
    as the hook. Every value but the tensors of a call is fixed here, for both buffers: the buffer
    `state` (rank, ptr_table, mask, timeout_ns, epochs and tickets [4] int32: per buffer [dispatch,
    combine]) and the error site (err, err_any: pointers, 0 when not counted)."""

    __slots__ = ()

    def __init__(self, spec: LowLatencySpec, layout: BufferLayout, num_sms: int, num_tokens: int, with_hook: bool,
                 device: int, state, err: int, err_any: int):
        module = get_module(spec, device)
        self.with_hook = with_hook
        common = dict(max_tokens=layout.max_tokens, rank=state.rank, mask=state.mask)
        send = dict(common, num_tokens=num_tokens, ptr_table=state.ptr_table, err=err, err_any=err_any)
        recv = dict(common, timeout_ns=state.timeout_ns)

        def offsets(idx):
            return dict(flags_off=layout.flags(idx), counts_off=layout.counts(idx), recv_off=layout.recv(idx),
                        epoch_counter=state.epochs.data_ptr() + 4 * 2 * idx)

        def ticket(idx):
            return dict(send_ticket=state.tickets.data_ptr() + 4 * 2 * idx)

        if not with_hook:
            P = DISPATCH_SEND_RECV_PARAMS
            self._send = module.launcher("send_recv", num_sms, spec.threads, P.codes,
                                         smem=max(spec.send_smem, spec.recv_smem))
            self._send_args = [P.bind(_DISPATCH_INPUTS + " " + _DISPATCH_OUTPUTS, **{**send, **recv}, **offsets(i),
                                      **ticket(i)) for i in (0, 1)]
            return
        self._send = module.launcher("send", max(1, min(num_tokens, num_sms)), spec.threads,
                                     DISPATCH_SEND_PARAMS.codes, smem=spec.send_smem)
        self._recv = module.launcher("recv", num_sms, spec.threads, DISPATCH_RECV_PARAMS.codes, smem=spec.recv_smem)
        self._send_args = [DISPATCH_SEND_PARAMS.bind(_DISPATCH_INPUTS, **send, **offsets(i), **ticket(i))
                           for i in (0, 1)]
        local = dict(local_base=state.local_base)
        self._recv_args = [DISPATCH_RECV_PARAMS.bind(_DISPATCH_OUTPUTS, **recv, **local, **offsets(i)) for i in (0, 1)]


class CombineLaunch(_PreparedLaunch):
    """The launches of one low-latency combine signature, prepared once: one send_recv launch, or
    (with_hook) the send launch (num_sms blocks) and the receive launch (min(T, num_sms)) as the hook."""

    __slots__ = ()

    def __init__(self, spec: LowLatencySpec, layout: BufferLayout, num_sms: int, num_tokens: int, with_hook: bool,
                 device: int, state):
        module = get_module(spec, device)
        self.with_hook = with_hook
        common = dict(num_tokens=num_tokens, max_tokens=layout.max_tokens, mask=state.mask,
                      timeout_ns=state.timeout_ns)
        send = dict(common, rank=state.rank, ptr_table=state.ptr_table)

        def offsets(idx):
            return dict(flags_off=layout.flags(idx), recv_off=layout.combine_recv(idx),
                        epoch_counter=state.epochs.data_ptr() + 4 * (2 * idx + 1))

        def send_only(idx):
            return dict(weights_off=layout.weights(idx), send_ticket=state.tickets.data_ptr() + 4 * (2 * idx + 1))

        if not with_hook:
            P = COMBINE_SEND_RECV_PARAMS
            self._send = module.launcher("send_recv", num_sms, spec.threads, P.codes)
            self._send_args = [P.bind(_COMBINE_INPUTS + " " + _COMBINE_OUTPUTS, **send, **offsets(i), **send_only(i))
                               for i in (0, 1)]
            return
        self._send = module.launcher("send", num_sms, spec.threads, COMBINE_SEND_PARAMS.codes)
        self._recv = module.launcher("recv", max(1, min(num_tokens, num_sms)), spec.threads, COMBINE_RECV_PARAMS.codes)
        self._send_args = [COMBINE_SEND_PARAMS.bind(_COMBINE_INPUTS, **send, **offsets(i), **send_only(i))
                           for i in (0, 1)]
        local = dict(local_base=state.local_base)
        self._recv_args = [COMBINE_RECV_PARAMS.bind(_COMBINE_OUTPUTS, **common, **local, **offsets(i)) for i in (0, 1)]


# the per-call pointers of each family, in the order DispatchLaunch / CombineLaunch take them
_DISPATCH_INPUTS = "x topk_idx topk_weights"
_DISPATCH_OUTPUTS = ("recv_x recv_scales recv_count src_info layout_range token_rows token_weights recv_tokens "
                     "cumulative_stats wait_stats")
_COMBINE_INPUTS = "x token_rows recv_tokens topk_weights carried_weights"
_COMBINE_OUTPUTS = "out topk_idx wait_stats"


def launch_barrier(num_ranks: int, *, ptr_table, rank, epoch, mask, timeout_ns) -> None:
    """One device barrier over the ranks' barrier counters (at BARRIER_OFF of every buffer)."""
    spec = BarrierSpec(num_ranks)
    get_module(spec, ptr_table.device.index).launch("barrier", 1, BARRIER_THREADS, *BARRIER_PARAMS.pack(
        ptr_table=ptr_table, barrier_off=BARRIER_OFF, rank=rank, epoch=epoch, mask=mask, timeout_ns=timeout_ns))
