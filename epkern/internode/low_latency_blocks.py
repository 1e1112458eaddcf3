"""The fixed-size blocks of low-latency mode over a collective, as plain tensor math (any device).

Dispatch: each rank sends every rank one block of M + 1 rows of `DispatchRows.row_bytes` bytes,
the same size whatever the routing, so one all_to_all_single with equal splits moves a whole
dispatch and nobody needs a count before it starts (no host sync, capturable). Row t < T of a
block is token t (its bf16 or e4m3 row | scales | top-k ids | top-k weights if carried); rows
T..M-1 are not written; row M is the header (int32 token count T, 0 for a masked destination).
Every block carries the same token rows: a token crosses once per rank, and each receiver picks
the tokens that have one of its experts and fans them out to its local experts, ordered by
source rank, then token index (the NVLink kernels' order).

Combine: each rank sums the rows of a token's experts it holds (fp32, weighted, rounded to bf16)
into row t of the block for the token's source, M rows per destination; the source adds the R
partial rows of each token in fp32 and rounds to bf16 once more.

Every step is a fixed-size torch op (index_select, scatter, gather, cumsum, where): no .item(),
.tolist() or nonzero on device data, so the same code runs on CPU tensors (gloo) and inside a
CUDA graph (NCCL).
"""
from __future__ import annotations

import dataclasses

import torch

from ..fp8 import pack_ue8m0, per_token_cast_to_fp8
from ..normal.torch_backend import _as_bytes

SCALE_GROUP = 128   # channels per FP8 scale
ROW_ALIGN = 16      # bytes: every field starts 4-byte aligned, rows 16


@dataclasses.dataclass(frozen=True)
class DispatchRows:
    """Byte layout of one dispatch row: payload | scales | K int32 ids | K fp32 weights (carried) | pad.

    kind: a dispatch format of epkern.low_latency.kernels (bf16, fp8, fp8_round, fp8_ue8m0); the
    scales are fp32 per 128 channels, or their UE8M0 exponent bytes four per int32 (zero bytes pad
    the last word), as the NVLink path returns them."""

    kind: str
    hidden: int
    num_topk: int
    carry_weights: bool = False

    @property
    def use_fp8(self) -> bool:
        return self.kind != "bf16"

    @property
    def use_ue8m0(self) -> bool:
        return self.kind == "fp8_ue8m0"

    @property
    def payload_bytes(self) -> int:
        return self.hidden if self.use_fp8 else 2 * self.hidden

    @property
    def scale_cols(self) -> int:
        """Scale columns per token: fp32 groups, or int32 words of four UE8M0 bytes (0 for bf16)."""
        if not self.use_fp8:
            return 0
        groups = self.hidden // SCALE_GROUP
        return -(-groups // 4) if self.use_ue8m0 else groups

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.int32 if self.use_ue8m0 else torch.float32

    @property
    def ids_offset(self) -> int:
        return self.payload_bytes + 4 * self.scale_cols

    @property
    def weights_offset(self) -> int:
        return self.ids_offset + 4 * self.num_topk

    @property
    def row_bytes(self) -> int:
        used = self.weights_offset + (4 * self.num_topk if self.carry_weights else 0)
        return ROW_ALIGN * -(-used // ROW_ALIGN)

    def block_bytes(self, max_tokens: int) -> int:
        """Bytes one rank sends each rank per dispatch: M token rows and the header row."""
        return (max_tokens + 1) * self.row_bytes


@dataclasses.dataclass
class DispatchOutputs:
    """The tensors low_latency_dispatch returns, filled in place by unpack_dispatch (they are handed
    to the caller before the hook receives into them)."""
    recv_x: torch.Tensor              # [L, R*M, H] bf16 or float8_e4m3fn
    recv_scales: torch.Tensor | None  # [L, R*M, S] fp32 or int32, column-major per expert
    recv_count: torch.Tensor          # [L] int32
    src_info: torch.Tensor            # [L, R*M] int32
    layout_range: torch.Tensor        # [L, R] int64
    token_rows: torch.Tensor          # [R, M, K] int32
    recv_tokens: torch.Tensor         # [R] int32
    token_weights: torch.Tensor | None  # [R, M, K] fp32 (weights carried)


def _field(rows: torch.Tensor, offset: int, dtype: torch.dtype, width: int) -> torch.Tensor:
    """[..., width] of dtype read at byte `offset` of every row of rows [..., row_bytes] uint8."""
    nbytes = width * torch.empty((), dtype=dtype).element_size()
    return rows[..., offset:offset + nbytes].contiguous().view(dtype)


def _token_scales(fmt: DispatchRows, x: torch.Tensor):
    """(e4m3 [T, H], scales [T, S]) by epkern.fp8's rule; UE8M0 words padded with zero bytes."""
    round_scale = fmt.kind in ("fp8_round", "fp8_ue8m0")
    q, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    if fmt.use_ue8m0:
        pad = 4 * fmt.scale_cols - scales.shape[1]
        scales = pack_ue8m0(torch.nn.functional.pad(scales, (0, pad)))   # a zero scale has exponent byte 0
    return q, scales


def pack_dispatch(fmt: DispatchRows, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None,
                  max_tokens: int, num_ranks: int, masked: torch.Tensor) -> torch.Tensor:
    """The send tensor [R, M + 1, row_bytes] uint8: block d for rank d (masked[d] != 0: a count of 0)."""
    num_tokens = x.shape[0]
    if fmt.use_fp8:
        q, scales = _token_scales(fmt, x)
        parts = [q.view(torch.uint8), _as_bytes(scales)]
    else:
        parts = [_as_bytes(x)]
    parts.append(_as_bytes(topk_idx.to(torch.int32)))
    if fmt.carry_weights:
        parts.append(_as_bytes(topk_weights))
    used = sum(p.shape[1] for p in parts)
    if used < fmt.row_bytes:
        parts.append(torch.zeros(num_tokens, fmt.row_bytes - used, dtype=torch.uint8, device=x.device))
    rows = torch.cat(parts, dim=1)
    send = torch.empty(num_ranks, max_tokens + 1, fmt.row_bytes, dtype=torch.uint8, device=x.device)
    send[:, :num_tokens] = rows                                         # every block, the same token rows
    header = send[:, max_tokens]
    header.zero_()
    counts = torch.where(masked != 0, 0, num_tokens).to(torch.int32)   # [R]
    header[:, :4] = counts.view(torch.uint8).view(num_ranks, 4)
    return send


def unpack_dispatch(fmt: DispatchRows, recv: torch.Tensor, rank: int, num_local_experts: int,
                    masked: torch.Tensor, out: DispatchOutputs) -> None:
    """Fan the received blocks [R, M + 1, row_bytes] out to the local experts, into `out`.

    Expert l's rows are the tokens of every unmasked source that chose expert rank * L + l, ordered
    by source rank, then token index; rows past recv_count[l] keep whatever was there before."""
    R, M = recv.shape[0], recv.shape[1] - 1
    L, K, RM = num_local_experts, fmt.num_topk, recv.shape[0] * (recv.shape[1] - 1)
    device = recv.device
    tokens = recv[:, :M]
    counts = torch.where(masked != 0, 0, _field(recv[:, M], 0, torch.int32, 1).view(R))   # [R]
    valid = torch.arange(M, device=device) < counts.unsqueeze(1)                          # [R, M]
    local = _field(tokens, fmt.ids_offset, torch.int32, K).long() - rank * L               # [R, M, K]
    copy_here = valid.unsqueeze(2) & (local >= 0) & (local < L)
    local = torch.where(copy_here, local, L)                                              # L: not here

    # hit[r, t, l]: source r's token t goes to local expert l (column L collects the misses)
    hit = torch.zeros(R, M, L + 1, dtype=torch.int32, device=device).scatter_(2, local, 1)[..., :L]
    per_source = hit.sum(1)                                            # [R, L]
    order = hit.permute(2, 0, 1).reshape(L, RM)                        # expert, then source, then token
    row = order.cumsum(1) - 1                                          # the row of each hit in its expert
    count = per_source.sum(0)                                          # [L]
    begin = per_source.cumsum(0) - per_source

    # src[l, j]: the (source, token) slot r * M + t behind row j of expert l (trash column RM for misses)
    slots = torch.arange(RM, device=device).expand(L, RM)
    src = torch.zeros(L, RM + 1, dtype=torch.int64, device=device)
    src.scatter_(1, torch.where(order != 0, row, RM), slots)
    src = src[:, :RM]
    flat = recv.view(R * (M + 1), fmt.row_bytes)
    picked = ((src // M) * (M + 1) + src % M).view(-1)                 # rows of flat, header rows skipped
    torch.index_select(flat[:, :fmt.payload_bytes], 0, picked,
                       out=out.recv_x.view(torch.uint8).view(L * RM, fmt.payload_bytes))
    if fmt.use_fp8:
        scales = torch.index_select(flat[:, fmt.payload_bytes:fmt.ids_offset], 0, picked)
        out.recv_scales.copy_(scales.view(fmt.scale_dtype).view(L, RM, fmt.scale_cols))

    written = torch.arange(RM, device=device) < count.unsqueeze(1)
    out.src_info.copy_(torch.where(written, src % M, -1))
    out.recv_count.copy_(count)
    out.layout_range.copy_((begin.t().to(torch.int64) << 32) | per_source.t().to(torch.int64))
    expert_row = torch.gather(row.view(L, R, M).permute(1, 2, 0), 2, local.clamp(max=L - 1))   # [R, M, K]
    out.token_rows.copy_(torch.where(copy_here, local * RM + expert_row, -1))
    out.recv_tokens.copy_(counts)
    if out.token_weights is not None:
        weights = _field(tokens, fmt.weights_offset, torch.float32, K)
        out.token_weights.copy_(torch.where(valid.unsqueeze(2), weights, 0.0))


def pack_weights(topk_weights: torch.Tensor, max_tokens: int, num_ranks: int) -> torch.Tensor:
    """[R, M, K] fp32: every rank gets our tokens' top-k weights (combine without carried weights)."""
    send = torch.empty(num_ranks, max_tokens, topk_weights.shape[1], dtype=torch.float32,
                       device=topk_weights.device)
    send[:, :topk_weights.shape[0]] = topk_weights
    return send


def reduce_partials(x: torch.Tensor, token_rows: torch.Tensor, weights: torch.Tensor,
                    masked: torch.Tensor) -> torch.Tensor:
    """Expert side: [R, M, H] bf16, row t of block r = sum_k weights[r, t, k] * x[token_rows[r, t, k]]
    over the copies held here (fp32 in k order, rounded to bf16); zero for sources masked here."""
    R, M, K = token_rows.shape
    H = x.shape[-1]
    flat = x.reshape(-1, H)
    rows = token_rows.view(R * M, K).long()
    held = (rows >= 0) & (masked == 0).repeat_interleave(M).unsqueeze(1)
    w = weights.reshape(R * M, K)
    acc = torch.zeros(R * M, H, dtype=torch.float32, device=x.device)
    for k in range(K):
        copy = flat.index_select(0, rows[:, k].clamp(min=0)).float()
        acc += torch.where(held[:, k:k + 1], copy * w[:, k:k + 1], 0.0)   # where: rows past a count may hold NaN
    return acc.to(torch.bfloat16).view(R, M, H)


def sum_partials(back: torch.Tensor, masked: torch.Tensor, out: torch.Tensor) -> None:
    """Source side: out[t] = bf16(sum over unmasked ranks r of back[r, t]) for the T rows of out."""
    part = back[:, :out.shape[0]].float()
    keep = (masked == 0).view(-1, 1, 1)
    out.copy_(torch.where(keep, part, 0.0).sum(0))
