"""Low-latency kernels: the spec, the peer-buffer layout and the sizes both sides agree on.

One spec per (kind, hidden, ranks, experts, top-k); kind is a dispatch format (bf16, fp8,
fp8_round, fp8_ue8m0) or "combine" (which also holds the device barrier). The token count and
the maximum tokens per rank M are run-time kernel arguments: changing them compiles nothing.
"""
from __future__ import annotations

import dataclasses

from epkern.codegen import KernelSpec, check_choice, check_int

DISPATCH_KINDS = ("bf16", "fp8", "fp8_round", "fp8_ue8m0")
KINDS = DISPATCH_KINDS + ("combine",)
MAX_RANKS = 64
MAX_TOPK = 32
MAX_EXPERTS = 8192
MAX_DISPATCH_TOKENS = 1 << 20  # per rank and call: size hints and buffers beyond it are a mistake (R*M slots fit int32)
ALIGN = 128
BARRIER_BYTES = 256  # [R] int32 barrier counters at the start of the buffer (never cleaned)
NUM_FLAG_ARRAYS = 3  # dispatch, combine, weights: [R] 64-bit epoch signals each


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
    template = "low_latency.cu.j2"

    kind: str
    hidden: int
    num_ranks: int
    num_experts: int
    num_topk: int
    threads: int = 512

    def validate(self) -> None:
        n = type(self).__name__
        check_choice(n, "kind", self.kind, KINDS)
        check_int(n, "hidden", self.hidden, 128, 1 << 16, multiple_of=128)
        check_int(n, "num_ranks", self.num_ranks, 1, MAX_RANKS)
        check_int(n, "num_experts", self.num_experts, self.num_ranks, MAX_EXPERTS, multiple_of=self.num_ranks)
        check_int(n, "num_topk", self.num_topk, 1, MAX_TOPK)
        check_int(n, "threads", self.threads, max(64, 32 * ((self.num_topk + 31) // 32)), 1024, multiple_of=32)

    @property
    def use_fp8(self) -> bool:
        return self.kind.startswith("fp8")

    def template_vars(self):
        return dict(kind=self.kind, hidden=self.hidden, num_ranks=self.num_ranks, num_experts=self.num_experts,
                    num_topk=self.num_topk, threads=self.threads, use_fp8=self.use_fp8,
                    round_scale=self.kind in ("fp8_round", "fp8_ue8m0"), use_ue8m0=self.kind == "fp8_ue8m0",
                    slot_bytes=slot_bytes(self.hidden))

    def name_fields(self) -> str:
        return f"{self.kind}_h{self.hidden}_r{self.num_ranks}_e{self.num_experts}_k{self.num_topk}"

    @property
    def header_bytes(self) -> int:
        """Dispatch message header: the token's K expert ids and K slots (int32), padded to 16 bytes."""
        return header_bytes(self.num_topk)

    @property
    def message_bytes(self) -> int:
        """Bytes of one dispatch message (one per token and destination rank): header, payload, fp32
        scales padded to 16 bytes."""
        if self.use_fp8:
            return self.header_bytes + self.hidden + 16 * -(-(self.hidden // 128) // 4)
        return self.header_bytes + 2 * self.hidden

    @property
    def send_smem(self) -> int:
        """Dynamic shared memory of the dispatch send kernel: the staged message or the expert histogram."""
        staged = self.message_bytes if self.use_fp8 else self.header_bytes
        return max(staged, 4 * self.num_experts)

    @property
    def recv_smem(self) -> int:
        """Dynamic shared memory of the dispatch receive kernel: the first row of each (source, expert)."""
        return 4 * self.num_experts


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def header_bytes(num_topk: int) -> int:
    return 16 * -(-8 * num_topk // 16)


def slot_bytes(hidden: int) -> int:
    """One receive slot: the largest dispatch message (bf16, top-32 header); holds a combine row too."""
    return header_bytes(MAX_TOPK) + 2 * hidden


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """Byte offsets inside each rank's peer buffer for (M, hidden, ranks, experts); two buffers alternate.

    [barrier counters][buffer 0][buffer 1]; each buffer is
    [flags 3 x R uint64][counts E int32][weights R x M x 32 fp32][recv R x M slots][send L x R*M x H bf16]
    (the send region is the zero-copy combine source, get_next_low_latency_combine_buffer).
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
    def send_bytes(self) -> int:
        return _align(self.num_experts * self.max_tokens * 2 * self.hidden)

    @property
    def buffer_bytes(self) -> int:
        return self.flags_bytes + self.counts_bytes + self.weights_bytes + self.recv_bytes + self.send_bytes

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

    def send(self, idx: int) -> int:
        return self.recv(idx) + self.recv_bytes


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
    # per token and buffer: weights, a recv slot per rank, the send rows; alignment only adds
    per_token = 2 * (num_ranks * (4 * MAX_TOPK + slot_bytes(hidden)) + num_experts * 2 * hidden)
    m = min(MAX_DISPATCH_TOKENS, max(0, (num_bytes - fixed) // per_token))
    while m > 0 and BufferLayout(m, hidden, num_ranks, num_experts).total_bytes > num_bytes:
        m -= 1
    return m
