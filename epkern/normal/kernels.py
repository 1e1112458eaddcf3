"""Intranode (NVLink) kernel family: the spec, the peer-buffer layout and the launch wrappers.

One spec per kernel, one template per kernel (shared device code in templates/include/):
  notify   templates/intranode_notify.cu.j2,   specialized on the rank count;
  dispatch templates/intranode_dispatch.cu.j2, on (dtype, hidden, ranks, top-k, SMs, warp split);
  combine  templates/intranode_combine.cu.j2,  on (hidden, ranks, top-k, SMs, warp split).
Token counts, expert counts, alignment and buffer offsets are run-time arguments, so batch sizes
never trigger a compile. Every size both sides agree on (slot layout, header offsets, limits,
status codes) is computed here and handed to the template; each kernel's argument list is a
KernelParams below, which tests/test_kernel_params.py checks against the template.
"""
from __future__ import annotations

import dataclasses
import functools

from epkern.codegen import KernelParams, KernelSpec, check_choice, check_int, get_module

MAX_RANKS = 8
MAX_BLOCKS = 132
MAX_TOPK = 32
MAX_DYNAMIC_SMEM = 227 * 1024   # per block on sm_90

# peer buffer layout: a 1 MiB header (flags, chunk table, counts), the flag area, the payload
READY_OFF = 0
NOTIFY_OFF = 256
CHUNK_OFF = 512
COUNTS_OFF = 32768
HEADER_BYTES = 1 << 20
MIN_PEER_BYTES = HEADER_BYTES + (1 << 20)   # the smallest peer buffer the NVLink backend takes
FLAG_FRACTION = 17          # the flag area takes 1/17 of the rest: 4 bytes per >= 64-byte slot
NOTIFY_THREADS = 1024

# host-mapped status word: 0x80000000 | kind << 24 | kernel << 16 | rank (templates/include/intranode_sync.cuh.j2)
STATUS_TIMEOUT = 1    # waited for `rank` past the deadline
STATUS_OVERFLOW = 2   # a row for `rank` does not fit its buffer
KERNEL_IDS = {"notify": 1, "dispatch": 2, "combine": 3}


def decode_status(word: int) -> tuple[int, str, int]:
    """(kind, kernel name, rank) of a nonzero status word."""
    kernel = (word >> 16) & 0xFF
    name = next((k for k, v in KERNEL_IDS.items() if v == kernel), f"kernel {kernel}")
    return (word >> 24) & 0x7F, name, word & 0xFFFF


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def dispatch_row_bytes(hidden: int, fp8: bool) -> int:
    """A dispatch slot's row: bf16 (or e4m3 bytes and their fp32 scales, one per 128), padded to 16."""
    return _round_up(hidden * (1 if fp8 else 2) + (hidden // 128 * 4 if fp8 else 0), 16)


def dispatch_slot_bytes(hidden: int, num_topk: int, fp8: bool) -> int:
    """The row, then {src_idx, -, -, -, idx[K], w[K]} padded to 16."""
    return dispatch_row_bytes(hidden, fp8) + _round_up(16 + 8 * num_topk, 16)


def combine_row_bytes(hidden: int) -> int:
    return _round_up(hidden * 2, 16)


def combine_slot_bytes(hidden: int, num_topk: int) -> int:
    """The bf16 row, then its fp32 top-k weights padded to 16."""
    return combine_row_bytes(hidden) + _round_up(4 * num_topk, 16)


@dataclasses.dataclass(frozen=True)
class PeerLayout:
    """Where the flag area and payload lie in a peer buffer of nbytes (the same on every rank)."""

    nbytes: int

    @property
    def flags_off(self) -> int:
        return HEADER_BYTES

    @property
    def flag_capacity(self) -> int:
        return max(0, (self.nbytes - HEADER_BYTES) // FLAG_FRACTION // 4096 * 4096 // 4)

    @property
    def payload_off(self) -> int:
        return HEADER_BYTES + self.flag_capacity * 4

    def slot_capacity(self, slot_bytes: int) -> int:
        return max(0, min(self.flag_capacity, (self.nbytes - self.payload_off) // slot_bytes))

    def counts_capacity(self) -> int:
        return (HEADER_BYTES - COUNTS_OFF) // 4


MAX_HINT_SLOTS = 1 << 24  # token slots (tokens per rank x ranks) a size hint accepts: beyond any GPU's memory


def required_bytes(num_slots: int, slot_bytes: int) -> int:
    """The smallest peer buffer holding num_slots slots of slot_bytes (with its flags)."""
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or not 0 <= num_slots <= MAX_HINT_SLOTS:
        raise ValueError(f"{num_slots!r} token slots (num_max_tokens x num_ranks): expected an int in "
                         f"[0, {MAX_HINT_SLOTS}]")
    rest = max(FLAG_FRACTION * (num_slots * 4 + 4096),
               -(-num_slots * slot_bytes * FLAG_FRACTION // (FLAG_FRACTION - 1)) + 2 * 4096)
    nbytes = HEADER_BYTES + _round_up(rest, 4096)
    while PeerLayout(nbytes).slot_capacity(slot_bytes) < num_slots:   # rounding guard: a step or two
        nbytes += FLAG_FRACTION * 4096
    return nbytes


@dataclasses.dataclass(frozen=True)
class IntranodeSpec(KernelSpec):
    family = "intranode"

    kernel: str                 # notify | dispatch | combine
    num_ranks: int
    hidden: int = 0
    num_topk: int = 0
    dtype: str = "bf16"         # dispatch payload: bf16 or fp8 (e4m3 bytes + fp32 scales per 128)
    num_sms: int = 1
    send_warps: int = 0
    recv_warps: int = 0

    def validate(self) -> None:
        n = type(self).__name__
        check_choice(n, "kernel", self.kernel, ("notify", "dispatch", "combine"))
        check_int(n, "num_ranks", self.num_ranks, 1, MAX_RANKS)
        if self.kernel == "notify":
            if (self.hidden, self.num_topk, self.dtype, self.num_sms, self.send_warps, self.recv_warps) != \
                    (0, 0, "bf16", 1, 0, 0):
                raise ValueError(f"{n}: the notify kernel takes num_ranks only")
            return
        check_choice(n, "dtype", self.dtype, ("bf16", "fp8") if self.kernel == "dispatch" else ("bf16",))
        check_int(n, "hidden", self.hidden, 8, 1 << 16, multiple_of=128 if self.dtype == "fp8" else 8)
        check_int(n, "num_topk", self.num_topk, 0, MAX_TOPK)
        check_int(n, "num_sms", self.num_sms, 1, MAX_BLOCKS)
        check_int(n, "send_warps", self.send_warps, 1, 32)
        check_int(n, "recv_warps", self.recv_warps, 1, 32)
        if self.send_warps + self.recv_warps > 32:
            raise ValueError(f"{n}: send_warps + recv_warps = {self.send_warps + self.recv_warps} exceeds 32 warps")
        if self.dynamic_smem > MAX_DYNAMIC_SMEM:
            raise ValueError(f"{n}: {self.send_warps} combine sender warps need {self.dynamic_smem} bytes of shared "
                             f"memory, more than {MAX_DYNAMIC_SMEM}")

    @property
    def threads(self) -> int:
        return NOTIFY_THREADS if self.kernel == "notify" else 32 * (self.send_warps + self.recv_warps)

    @property
    def chunk_bytes(self) -> int:
        """Combine: bytes of one bulk copy (COMBINE_STAGES shared-memory stages of it per sender warp)."""
        return min(COMBINE_CHUNK_BYTES, self.hidden * 2) if self.kernel == "combine" else 0

    @property
    def dynamic_smem(self) -> int:
        return self.send_warps * COMBINE_STAGES * self.chunk_bytes

    @property
    def template(self) -> str:
        return f"intranode_{self.kernel}.cu.j2"

    def template_vars(self):
        v = dict(num_ranks=self.num_ranks, max_ranks=MAX_RANKS, threads=self.threads,
                 ready_off=READY_OFF, notify_off=NOTIFY_OFF, chunk_off=CHUNK_OFF, counts_off=COUNTS_OFF,
                 max_blocks=MAX_BLOCKS, fail_timeout=STATUS_TIMEOUT, fail_overflow=STATUS_OVERFLOW,
                 kernel_ids=KERNEL_IDS)
        if self.kernel == "notify":
            return v
        v.update(hidden=self.hidden, num_topk=self.num_topk, max_topk=MAX_TOPK, num_sms=self.num_sms,
                 send_warps=self.send_warps, recv_warps=self.recv_warps)
        if self.kernel == "dispatch":
            fp8 = self.dtype == "fp8"
            row_int4 = self.hidden * (1 if fp8 else 2) // 16
            v.update(fp8=fp8, x_row_bytes=self.hidden * (1 if fp8 else 2), num_scales=self.hidden // 128 if fp8 else 0,
                     row_bytes=dispatch_row_bytes(self.hidden, fp8),
                     slot_bytes=dispatch_slot_bytes(self.hidden, self.num_topk, fp8),
                     unroll=max(1, min(8, -(-row_int4 // 32))))
        else:
            v.update(row_bytes=combine_row_bytes(self.hidden), slot_bytes=combine_slot_bytes(self.hidden, self.num_topk),
                     chunk_bytes=self.chunk_bytes, stages=COMBINE_STAGES)
        return v

    def name_fields(self) -> str:
        if self.kernel == "notify":
            return f"notify_r{self.num_ranks}"
        dtype = f"_{self.dtype}" if self.kernel == "dispatch" else ""
        return (f"{self.kernel}{dtype}_h{self.hidden}_r{self.num_ranks}_k{self.num_topk}_s{self.num_sms}"
                f"_w{self.send_warps}x{self.recv_warps}")


# warp split per kernel: senders keep NVLink busy, receivers/reducers drain what arrived. Measured
# at 24 SMs on 2 x H200 (benchmarks/intranode_sweep.py; figures in benchmarks/intranode_notes.md): dispatch is
# best at 12 + 6 (16 + 8 within noise); combine is bound by its reducers: 10+10 424 us, 16+16 387,
# 12+20 353, 8+24 348.
DISPATCH_WARPS = (12, 6)
COMBINE_WARPS = (8, 24)
COMBINE_CHUNK_BYTES = 8192   # combine senders: 8 warps x 2 stages x 8 KB = 128 KB of shared memory
COMBINE_STAGES = 2   # 3 measured no faster (benchmarks/intranode_notes.md)


@functools.lru_cache(maxsize=256)
def notify_spec(num_ranks: int) -> IntranodeSpec:
    return IntranodeSpec("notify", num_ranks)


@functools.lru_cache(maxsize=256)
def dispatch_spec(num_ranks: int, hidden: int, num_topk: int, fp8: bool, num_sms: int) -> IntranodeSpec:
    return IntranodeSpec("dispatch", num_ranks, hidden, num_topk, "fp8" if fp8 else "bf16", num_sms, *DISPATCH_WARPS)


@functools.lru_cache(maxsize=256)
def combine_spec(num_ranks: int, hidden: int, num_topk: int, num_sms: int) -> IntranodeSpec:
    return IntranodeSpec("combine", num_ranks, hidden, num_topk, "bf16", num_sms, *COMBINE_WARPS)


# -- launch wrappers (arguments already validated by the backend) ---------------------------------
# Each kernel's parameters in the order of its template's signature.
NOTIFY_PARAMS = KernelParams(
    "notify", "is_token_in_rank num_tokens_per_rank num_tokens_per_expert num_tokens:i32 experts_per_rank:i32 "
    "expert_alignment:i32 rank:i32 seq_word call_id:u32 ptr_table timeout_ns:u64 rank_prefix_matrix send_head "
    "recv_expert_counts host_out:addr status:addr")
DISPATCH_PARAMS = KernelParams(
    "dispatch", "x x_scales topk_idx topk_weights send_head rank_prefix_matrix num_tokens:i32 num_out_rows:i32 "
    "experts_per_rank:i32 rank:i32 seq_word ptr_table flags_off:u64 payload_off:u64 slot_capacity:i64 "
    "timeout_ns:u64 recv_x recv_x_scales recv_topk_idx recv_topk_weights recv_src_idx status:addr "
    "round_index:i32 num_rounds:i32 window:i64")
COMBINE_PARAMS = KernelParams(
    "combine", "x topk_weights recv_src_idx rank_prefix_matrix send_head num_tokens:i32 rank:i32 seq_word "
    "ptr_table flags_off:u64 payload_off:u64 slot_capacity:i64 timeout_ns:u64 bias0 bias1 combined_x "
    "combined_weights status:addr round_index:i32 num_rounds:i32 window:i64")
PARAMS = {"notify": (NOTIFY_PARAMS,), "dispatch": (DISPATCH_PARAMS,), "combine": (COMBINE_PARAMS,)}


def launch_notify(stream, num_ranks, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, expert_alignment,
                  rank, seq_word, call_id, ptr_table, timeout_ns, rank_prefix_matrix, send_head, recv_expert_counts,
                  host_out_ptr, status_ptr):
    """seq_word: the buffer's device-side launch counter; call_id: what notify writes to host_out[0]."""
    spec = notify_spec(num_ranks)
    get_module(spec, is_token_in_rank.device.index).launch_values(
        "notify", 1, spec.threads, NOTIFY_PARAMS.codes, NOTIFY_PARAMS.values(
            is_token_in_rank=is_token_in_rank, num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_expert=num_tokens_per_expert, num_tokens=is_token_in_rank.shape[0],
            experts_per_rank=num_tokens_per_expert.numel() // num_ranks, expert_alignment=expert_alignment,
            rank=rank, seq_word=seq_word, call_id=call_id, ptr_table=ptr_table, timeout_ns=timeout_ns,
            rank_prefix_matrix=rank_prefix_matrix,
            send_head=send_head, recv_expert_counts=recv_expert_counts, host_out=host_out_ptr, status=status_ptr),
        stream=stream)


def launch_dispatch(stream, spec: IntranodeSpec, x, x_scales, topk_idx, topk_weights, send_head, rank_prefix_matrix,
                    num_out_rows, experts_per_rank, rank, seq_word, ptr_table, layout: PeerLayout, slot_capacity,
                    timeout_ns, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, status_ptr,
                    round_index=0, num_rounds=1, window=1):
    """One round of a dispatch (epkern/normal/rounds.py; the defaults: the whole dispatch at once)."""
    get_module(spec, x.device.index).launch_values(
        "dispatch", spec.num_sms, spec.threads, DISPATCH_PARAMS.codes, DISPATCH_PARAMS.values(
            x=x, x_scales=x_scales, topk_idx=topk_idx, topk_weights=topk_weights, send_head=send_head,
            rank_prefix_matrix=rank_prefix_matrix, num_tokens=x.shape[0], num_out_rows=num_out_rows,
            experts_per_rank=experts_per_rank, rank=rank, seq_word=seq_word, ptr_table=ptr_table,
            flags_off=layout.flags_off,
            payload_off=layout.payload_off, slot_capacity=slot_capacity, timeout_ns=timeout_ns, recv_x=recv_x,
            recv_x_scales=recv_x_scales, recv_topk_idx=recv_topk_idx, recv_topk_weights=recv_topk_weights,
            recv_src_idx=recv_src_idx, status=status_ptr, round_index=round_index, num_rounds=num_rounds,
            window=window),
        stream=stream)


def launch_combine(stream, spec: IntranodeSpec, x, topk_weights, recv_src_idx, rank_prefix_matrix, send_head,
                   rank, seq_word, ptr_table, layout: PeerLayout, slot_capacity, timeout_ns, bias0, bias1,
                   combined_x, combined_weights, status_ptr, round_index=0, num_rounds=1, window=1):
    """One round of a combine (epkern/normal/rounds.py; the defaults: the whole combine at once)."""
    get_module(spec, x.device.index).launch_values(
        "combine", spec.num_sms, spec.threads, COMBINE_PARAMS.codes, COMBINE_PARAMS.values(
            x=x, topk_weights=topk_weights, recv_src_idx=recv_src_idx, rank_prefix_matrix=rank_prefix_matrix,
            send_head=send_head, num_tokens=send_head.shape[0], rank=rank, seq_word=seq_word, ptr_table=ptr_table,
            flags_off=layout.flags_off, payload_off=layout.payload_off, slot_capacity=slot_capacity,
            timeout_ns=timeout_ns, bias0=bias0, bias1=bias1, combined_x=combined_x,
            combined_weights=combined_weights, status=status_ptr, round_index=round_index,
            num_rounds=num_rounds, window=window),
        smem=spec.dynamic_smem, stream=stream)


def deployment_skips(deployment) -> list[str]:
    """Why deployment_specs builds less than every intranode kernel for every EP size."""
    reasons = [f"EP {r}: more than {MAX_RANKS} ranks (intranode is one node)" for r in deployment.ep_sizes
               if r > MAX_RANKS]
    if deployment.hidden % 128 and any(r <= MAX_RANKS for r in deployment.ep_sizes):
        reasons.append(f"hidden {deployment.hidden} is not a multiple of 128: no FP8 dispatch")
    return reasons


def deployment_specs(deployment) -> list[IntranodeSpec]:
    """Notify, dispatch (bf16, fp8; with and without top-k) and combine at DeepEP's default 20 SMs and 24."""
    specs = []
    for r in deployment.ep_sizes:
        if r > MAX_RANKS:
            continue
        specs.append(notify_spec(r))
        for sms in (20, 24):
            for k in (deployment.num_topk, 0):
                specs.append(dispatch_spec(r, deployment.hidden, k, False, sms))
                if deployment.hidden % 128 == 0:
                    specs.append(dispatch_spec(r, deployment.hidden, k, True, sms))
                specs.append(combine_spec(r, deployment.hidden, k, sms))
    return specs
