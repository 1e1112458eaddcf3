"""The dispatch handle shared by every normal-mode backend, and the layout math behind it.

DeepEP's intranode handle is the tuple (rank_prefix_matrix, channel_prefix_matrix,
recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head). Ours has the same six
fields, in the same order, so code that unpacks or indexes it keeps working:

- rank_prefix_matrix [R, R] int32: [i][j] = tokens rank j receives from ranks 0..i.
- channel_prefix_matrix [R, 1] int32: tokens this rank sends to each rank (one "channel").
- recv_channel_prefix_matrix [R, 1] int32: start of channel 0 inside each source's rows (zeros).
- recv_src_idx [N] int32: the token index at its source rank of every received row.
- is_token_in_rank [T, R] bool.
- send_head [T, R] int32: the row a token lands in at rank r (its slot in that rank's recv_x);
  for a token not sent to r it holds -1 - (the slot the next sent token takes), so every
  token range can find its slot range without a scan.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class _HandleFields(NamedTuple):
    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor


class DispatchHandle(_HandleFields):
    """The six tensors, plus what the NVLink backend's streaming plan needs on the host (no __slots__,
    so a handle carries them as attributes): the most rows any rank received from other ranks and
    the most tokens any rank sent, both known to the host after a dispatch that synchronized (None
    after num_worst_tokens, or on a handle rebuilt from a plain tuple)."""

    max_remote_rows: int | None = None
    max_tokens: int | None = None

    @property
    def num_ranks(self) -> int:
        return self.rank_prefix_matrix.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.is_token_in_rank.shape[0]

    @property
    def num_recv_rows(self) -> int:
        """Rows of recv_x as returned by dispatch (num_worst_tokens when padded)."""
        return self.recv_src_idx.shape[0]


def check_handle(handle, num_ranks: int) -> DispatchHandle:
    """Accept a DispatchHandle (or a plain 6-tuple of the same tensors) made for num_ranks ranks."""
    if not isinstance(handle, tuple) or len(handle) != 6:
        raise TypeError("handle: expected the handle returned by Buffer.dispatch (a 6-tuple)")
    if not isinstance(handle, DispatchHandle):
        handle = DispatchHandle(*handle)
    if handle.rank_prefix_matrix.shape != (num_ranks, num_ranks):
        raise ValueError(f"handle: rank_prefix_matrix has shape {tuple(handle.rank_prefix_matrix.shape)}, "
                         f"expected ({num_ranks}, {num_ranks}); was it made by a buffer of another group?")
    return handle


def send_head_from_counts(is_token_in_rank: torch.Tensor, rank_prefix_matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Each token's slot at every destination: rows from lower ranks first, then token order."""
    base = rank_prefix_matrix[rank - 1] if rank > 0 else torch.zeros_like(rank_prefix_matrix[0])
    sent = is_token_in_rank.to(torch.int32)
    exclusive = torch.cumsum(sent, dim=0, dtype=torch.int32) - sent
    slot = exclusive + base.to(torch.int32).unsqueeze(0)
    return torch.where(is_token_in_rank, slot, -1 - slot).to(torch.int32).contiguous()


def channel_matrices(is_token_in_rank: torch.Tensor, num_ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    sent = is_token_in_rank.sum(0, dtype=torch.int32).view(num_ranks, 1).contiguous()
    return sent, torch.zeros_like(sent)


def aligned_counts(counts: list[int], alignment: int) -> list[int]:
    """Per-expert received counts rounded up to expert_alignment, as DeepEP reports them."""
    return [-(-c // alignment) * alignment for c in counts]
