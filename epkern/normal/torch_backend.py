"""Portable normal-mode backend: dispatch and combine over torch.distributed.all_to_all_single.

Runs wherever the process group runs (gloo on CPU for CI, NCCL on GPUs as the benchmark's
baseline). Semantics are the NVLink backend's: received rows ordered by source rank, then by
token index; the same DispatchHandle. Every row travels as raw bytes (x, FP8 scales, local top-k
ids and weights, source index packed side by side), so one collective moves a whole dispatch.
all_to_all_single needs its split sizes on the host, so this backend always syncs once per
call, num_worst_tokens included (the NVLink backend does not).

Every call first exchanges a small header through the group's store, under the timeout
(epkern.normal.header, shared with the two-hop backend): the call, shapes, dtypes and the counts
the data collective will use. A rank that does not arrive within timeout_s makes every waiting
rank raise PeerTimeoutError naming it; ranks that disagree (hidden sizes, dtypes, top-k, handles
of different dispatches) all raise the same ValueError on every rank, before any collective.
The counts of a fresh dispatch travel in that header, so it costs no extra collective.
"""
from __future__ import annotations

import math

import torch

from .handle import DispatchHandle, aligned_counts, channel_matrices, send_head_from_counts
from .header import CallHeaders


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, ...] -> [rows, nbytes] uint8 (a view where t is contiguous; zero rows included). Through
    1-D: a [T, 1] column-major view (SGLang's UE8M0 scales) counts as contiguous but keeps a last
    stride != 1."""
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    return t.contiguous().reshape(-1).view(torch.uint8).view(t.shape[0], row_bytes)


def _from_bytes(raw: torch.Tensor, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    if raw.stride(0) != raw.shape[1]:  # a column slice; one row of it counts as contiguous, yet keeps its stride
        raw = torch.empty(raw.shape, dtype=raw.dtype, device=raw.device).copy_(raw)
    return raw.view(dtype).view(shape)


def _describe(t: torch.Tensor | None):
    return None if t is None else [str(t.dtype).replace("torch.", ""), list(t.shape[1:])]


class RowUnpacker:
    """Reads the fields of received byte rows in the order they were packed, each into a fresh
    [rows, width] tensor: received row i lands at out[index[i]] (index: a slice or a tensor of rows);
    rows not written hold `fill` (padding to num_worst_tokens, or rows no peer sent)."""

    def __init__(self, raw: torch.Tensor, rows: int, index):
        self.raw, self.rows, self.index, self.col = raw, rows, index, 0

    def take(self, dtype: torch.dtype, width: int, fill) -> torch.Tensor:
        nbytes = width * torch.empty((), dtype=dtype).element_size()
        n = self.raw.shape[0]
        covered = isinstance(self.index, slice) and n == self.rows
        out = torch.empty((self.rows, width), dtype=dtype, device=self.raw.device) if covered else \
            torch.full((self.rows, width), fill, dtype=dtype, device=self.raw.device)
        out[self.index] = _from_bytes(self.raw[:, self.col:self.col + nbytes], dtype, (n, width))
        self.col += nbytes
        return out


class TorchBackend:
    name = "torch"
    carries_any_row = True    # every row travels as bytes
    peer = None               # no peer buffer

    def __init__(self, group, rank: int, num_ranks: int, timeout_s: float | None = None):
        self.group = group
        self.rank = rank
        self.num_ranks = num_ranks
        self.headers = CallHeaders(group, rank, num_ranks, timeout_s, "torch")
        self.timeout_s = self.headers.timeout_s

    # -- counts ------------------------------------------------------------------------------------
    def _exchange_counts(self, agree: dict, num_tokens_per_rank, num_tokens_per_expert: torch.Tensor):
        """Our [R + E] counts in the header -> (counts [R src, R dst], our per-expert counts)."""
        mine = torch.cat([num_tokens_per_rank.to(torch.int64), num_tokens_per_expert.to(torch.int64)]).tolist()
        table = torch.tensor(self.headers.exchange("dispatch", agree, counts=mine), dtype=torch.int64)
        R = self.num_ranks
        per_rank = table[:, :R]
        experts_per_rank = num_tokens_per_expert.numel() // R
        lo = R + self.rank * experts_per_rank
        per_expert = table[:, lo:lo + experts_per_rank].sum(0).tolist()
        return per_rank, per_expert

    def _send_order(self, is_token_in_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(destination, token) of every sent row, destination-major then token order."""
        pairs = is_token_in_rank.t().nonzero()
        return pairs[:, 0], pairs[:, 1]

    # -- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, *, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, expert_alignment: int, num_worst_tokens: int, handle, config=None):
        R, rank = self.num_ranks, self.rank
        device = x.device
        per_expert_list = None
        agree = dict(cached=handle is not None, hidden=x.shape[1], x=_describe(x),
                     scales=_describe(x_scales), topk_idx=_describe(topk_idx), topk_weights=_describe(topk_weights),
                     num_experts=None if num_tokens_per_expert is None else num_tokens_per_expert.numel())
        if handle is None:
            counts, per_expert = self._exchange_counts(agree, num_tokens_per_rank, num_tokens_per_expert)
            rank_prefix = counts.cumsum(0).to(torch.int32)
            rank_prefix_dev = rank_prefix.to(device)
            send_head = send_head_from_counts(is_token_in_rank, rank_prefix_dev, rank)
            per_expert_list = [] if num_worst_tokens > 0 else aligned_counts(per_expert, expert_alignment)
        else:
            rank_prefix_dev = handle.rank_prefix_matrix
            rank_prefix = rank_prefix_dev.cpu().to(torch.int64)
            counts = torch.diff(rank_prefix, dim=0, prepend=torch.zeros(1, R, dtype=torch.int64))
            is_token_in_rank, send_head = handle.is_token_in_rank, handle.send_head
            self.headers.exchange("dispatch", agree, flows={"data": (counts[rank].tolist(), counts[:, rank].tolist())})
        send_splits = counts[rank].tolist()
        recv_splits = counts[:, rank].tolist()
        num_recv = sum(recv_splits)
        if num_worst_tokens and num_recv > num_worst_tokens:
            raise ValueError(f"num_worst_tokens={num_worst_tokens}: rank {rank} receives {num_recv} tokens")

        # one byte row per (destination, token): x | scales | local top-k ids | weights | source index
        dest, token = self._send_order(is_token_in_rank)
        parts = [_as_bytes(x)[token]]
        if x_scales is not None:
            parts.append(_as_bytes(x_scales)[token])
        if topk_idx is not None:
            experts_per_rank = num_tokens_per_expert.numel() // R
            local = topk_idx[token] - (dest * experts_per_rank).unsqueeze(1)
            valid = (topk_idx[token] >= 0) & (local >= 0) & (local < experts_per_rank)
            parts.append(_as_bytes(torch.where(valid, local, torch.full_like(local, -1))))
            if topk_weights is not None:
                weights = topk_weights[token]
                parts.append(_as_bytes(torch.where(valid, weights, torch.zeros_like(weights))))
        parts.append(_as_bytes(token.to(torch.int32).view(-1, 1)))
        send = torch.cat(parts, dim=1) if len(token) else torch.empty(0, sum(p.shape[1] for p in parts),
                                                                      dtype=torch.uint8, device=device)
        recv = torch.empty(num_recv, send.shape[1], dtype=torch.uint8, device=device)
        self.headers.all_to_all(recv, send, recv_splits, send_splits, self.group, "dispatch")

        # unpack into fresh tensors, padded to num_worst_tokens rows
        rows = max(num_recv, num_worst_tokens)
        take = RowUnpacker(recv, rows, slice(0, num_recv)).take

        recv_x = take(x.dtype, x.shape[1], 0)
        recv_scales = take(x_scales.dtype, x_scales.shape[1], 0) if x_scales is not None else None
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx = take(torch.int64, topk_idx.shape[1], -1)
            if topk_weights is not None:
                recv_topk_weights = take(topk_weights.dtype, topk_weights.shape[1], 0)
        recv_src_idx = take(torch.int32, 1, -1).view(-1)
        if handle is None:
            sent, recv_channel = channel_matrices(is_token_in_rank, R)
            handle = DispatchHandle(rank_prefix_dev, sent, recv_channel, recv_src_idx, is_token_in_rank, send_head)
        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle

    # -- combine -----------------------------------------------------------------------------------
    def combine(self, *, x, handle: DispatchHandle, topk_weights, bias, config=None):
        R, rank = self.num_ranks, self.rank
        device = x.device
        rank_prefix = handle.rank_prefix_matrix.cpu().to(torch.int64)
        counts = torch.diff(rank_prefix, dim=0, prepend=torch.zeros(1, R, dtype=torch.int64))
        num_recv = int(rank_prefix[R - 1, rank])
        self.headers.exchange("combine", dict(hidden=x.shape[1], x=_describe(x)[:1], topk_weights=_describe(topk_weights)),
                              flows={"data": (counts[:, rank].tolist(), counts[rank].tolist())})
        parts = [_as_bytes(x[:num_recv])]
        if topk_weights is not None:
            parts.append(_as_bytes(topk_weights[:num_recv]))
        send = torch.cat(parts, dim=1)
        _, token = self._send_order(handle.is_token_in_rank)
        back = torch.empty(len(token), send.shape[1], dtype=torch.uint8, device=device)
        self.headers.all_to_all(back, send, counts[rank].tolist(), counts[:, rank].tolist(), self.group, "combine")

        # each token: the sum of the rows every rank it reached sent back (fp32 accumulation)
        T, H = handle.num_tokens, x.shape[1]
        hb = H * x.element_size()
        acc = torch.zeros(T, H, dtype=torch.float32, device=device)
        acc.index_add_(0, token, _from_bytes(back[:, :hb], x.dtype, (len(token), H)).float())
        for b in bias:
            acc += b.float()
        combined_weights = None
        if topk_weights is not None:
            K = topk_weights.shape[1]
            combined_weights = torch.zeros(T, K, dtype=topk_weights.dtype, device=device)
            combined_weights.index_add_(0, token, _from_bytes(back[:, hb:], topk_weights.dtype, (len(token), K)))
        return acc.to(x.dtype), combined_weights

    def raise_if_failed(self) -> None:
        pass  # collectives raise where they fail

    def destroy(self) -> None:
        pass
