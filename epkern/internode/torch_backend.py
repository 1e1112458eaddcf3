"""Normal mode across nodes over torch.distributed: the network hop, then the NVLink hop.

Dispatch: (1) each rank's counts (tokens per rank, per node, per expert) ride in the call header
every rank posts to the group's store under timeout_s (epkern.normal.header, as the single-node
torch backend), and every split size of both hops follows from them (`routing.splits`); (2) each token crosses the network
once per destination node, over the rail group (ranks with our local index), carrying the mask of
that node's ranks it reaches and its final row at each of them; (3) the forwarder sends it on over
the node group to each of them; (4) every row lands at its final position, so received rows are
ordered by source rank, then token index, as in single-node mode.
Combine reverses the path: rows return to their forwarder, which sums a token's rows of its node
(fp32) before the network hop back, so each token crosses the network once per node again; the
source sums the nodes' partial sums (fp32) and rounds once more to the input's dtype.

Both hops run `all_to_all_single` (NCCL between GPUs, gloo on CPU), so the split sizes go to the
host: one sync per call, as epkern.normal's torch backend. The header makes a rank that never
calls raise PeerTimeoutError naming it on every waiting rank, and ranks that disagree (hidden
size, dtypes, top-k, handles of different dispatches: each hop's send and receive sizes) raise
one ValueError on every rank, before either hop starts.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from ..normal.handle import aligned_counts, send_head_from_counts
from ..normal.header import CallHeaders
from ..normal.torch_backend import RowUnpacker, _as_bytes, _describe, _from_bytes
from . import routing
from .topology import NodeTopology


class InternodeHandle(NamedTuple):
    """What a cached dispatch and combine need, on every rank of both hops."""
    rank_prefix_matrix: torch.Tensor   # [R, R] int32, as in single-node mode
    is_token_in_rank: torch.Tensor     # [T, R] bool
    recv_src_idx: torch.Tensor         # [rows] int32: each received row's token index at its source
    is_token_in_node: torch.Tensor     # [T, N] bool
    counts: torch.Tensor               # [R, R] int64 on the host: tokens s sends to rank d
    node_counts: torch.Tensor          # [R, N] int64 on the host: tokens s sends to node n
    hop1_token: torch.Tensor           # source: the token of each network row we send
    forward_row: torch.Tensor          # forwarder: the network row each NVLink row we send came from
    hop2_slot: torch.Tensor            # receiver: the output row of each NVLink row we receive

    @property
    def num_tokens(self) -> int:
        return self.is_token_in_rank.shape[0]

    @property
    def num_recv_rows(self) -> int:
        return self.recv_src_idx.shape[0]


class HierarchicalTorchBackend:
    name = "torch-internode"
    carries_any_row = True    # every row travels as bytes
    peer = None               # no peer buffer

    def __init__(self, group, rank: int, num_ranks: int, topology: NodeTopology, timeout_s: float | None = None):
        if topology.num_ranks != num_ranks:
            raise ValueError(f"topology of {topology.num_ranks} ranks for a group of {num_ranks}")
        self.group, self.rank, self.num_ranks, self.topology = group, rank, num_ranks, topology
        self.headers = CallHeaders(group, rank, num_ranks, timeout_s, self.name)
        self.timeout_s = self.headers.timeout_s
        members = dist.get_process_group_ranks(group)
        # every rank creates every subgroup, in one order (torch.distributed requires it)
        node_groups = [dist.new_group([members[r] for r in topology.node_ranks(n)])
                       for n in range(topology.num_nodes)]
        rail_groups = [dist.new_group([members[r] for r in topology.rail_ranks(i)])
                       for i in range(topology.ranks_per_node)]
        self.node_group = node_groups[topology.node_of(rank)]
        self.rail_group = rail_groups[topology.local_of(rank)]

    # -- plumbing ----------------------------------------------------------------------------------
    def _all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                    op: str) -> torch.Tensor:
        recv = torch.empty(sum(recv_splits), send.shape[1], dtype=send.dtype, device=send.device)
        self.headers.all_to_all(recv, send, recv_splits, send_splits, group, op)
        return recv

    def _exchange_counts(self, agree: dict, is_token_in_rank, is_token_in_node, num_tokens_per_expert):
        """Our counts in the call header -> (counts [R, R], node_counts [R, N], our per-expert counts)."""
        mine = torch.cat([is_token_in_rank.sum(0), is_token_in_node.sum(0), num_tokens_per_expert]).to(torch.int64)
        table = torch.tensor(self.headers.exchange("dispatch", agree, counts=mine.tolist()), dtype=torch.int64)
        R, N = self.num_ranks, self.topology.num_nodes
        per_rank = num_tokens_per_expert.numel() // R
        lo = R + N + self.rank * per_rank
        return table[:, :R], table[:, R:R + N], table[:, lo:lo + per_rank].sum(0).tolist()

    def _flows(self, split: dict[str, list[int]], back: bool) -> dict[str, tuple[list[int], list[int]]]:
        """Per hop, the rows this rank sends to each rank of the group and expects from each (for
        the header's check); back: combine's direction."""
        topo, R = self.topology, self.num_ranks
        rail, node = topo.rail_ranks(topo.local_of(self.rank)), topo.node_ranks(topo.node_of(self.rank))

        def spread(sizes: list[int], peers: list[int]) -> list[int]:
            out = [0] * R
            for peer, n in zip(peers, sizes):
                out[peer] = n
            return out

        network = (spread(split["hop1_send"], rail), spread(split["hop1_recv"], rail))
        nvlink = (spread(split["hop2_send"], node), spread(split["hop2_recv"], node))
        return {"network": network[::-1] if back else network, "NVLink": nvlink[::-1] if back else nvlink}

    # -- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, *, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, expert_alignment: int, num_worst_tokens: int, handle, config=None):
        topo, rank, device = self.topology, self.rank, x.device
        L = topo.ranks_per_node
        per_expert_list = None
        agree = dict(cached=handle is not None, hidden=x.shape[1], x=_describe(x), scales=_describe(x_scales),
                     topk_idx=_describe(topk_idx), topk_weights=_describe(topk_weights),
                     num_experts=None if num_tokens_per_expert is None else num_tokens_per_expert.numel())
        if handle is None:
            is_token_in_node = routing.tokens_in_node(is_token_in_rank, topo)
            counts, node_counts, per_expert = self._exchange_counts(agree, is_token_in_rank, is_token_in_node,
                                                                     num_tokens_per_expert)
            rank_prefix = counts.cumsum(0).to(torch.int32).to(device)
            per_expert_list = [] if num_worst_tokens > 0 else aligned_counts(per_expert, expert_alignment)
        else:
            is_token_in_rank, is_token_in_node = handle.is_token_in_rank, handle.is_token_in_node
            counts, node_counts, rank_prefix = handle.counts, handle.node_counts, handle.rank_prefix_matrix
        num_recv = int(counts[:, rank].sum())
        if num_worst_tokens and num_recv > num_worst_tokens:
            raise ValueError(f"num_worst_tokens={num_worst_tokens}: rank {rank} receives {num_recv} tokens")
        split = routing.splits(counts, node_counts, topo, rank)
        if handle is not None:  # every rank's handle must be of the same dispatch
            self.headers.exchange("dispatch", agree, flows=self._flows(split, back=False))

        # (2) network hop: payload | local mask | final row at each local rank, one row per (token, node)
        hop1_node, hop1_token = routing.hop1_send_order(is_token_in_node)
        send_head = send_head_from_counts(is_token_in_rank, rank_prefix, rank)
        node_cols = hop1_node.unsqueeze(1) * L + torch.arange(L, device=device).unsqueeze(0)
        mask = is_token_in_rank[hop1_token.unsqueeze(1), node_cols]
        slots = send_head[hop1_token.unsqueeze(1), node_cols]
        payload = [_as_bytes(x)[hop1_token]]
        if x_scales is not None:
            payload.append(_as_bytes(x_scales)[hop1_token])
        if topk_idx is not None:
            payload.append(_as_bytes(topk_idx)[hop1_token])
            if topk_weights is not None:
                payload.append(_as_bytes(topk_weights)[hop1_token])
        payload.append(_as_bytes(hop1_token.to(torch.int32).view(-1, 1)))
        payload_bytes = sum(p.shape[1] for p in payload)
        send1 = torch.cat(payload + [_as_bytes(mask.to(torch.uint8)), _as_bytes(slots.to(torch.int32))], dim=1) \
            if len(hop1_token) else torch.empty(0, payload_bytes + 5 * L, dtype=torch.uint8, device=device)
        recv1 = self._all_to_all(send1, split["hop1_send"], split["hop1_recv"], self.rail_group, "dispatch")

        # (3) NVLink hop: each network row to every local rank of its mask, with its final row there
        recv_mask = recv1[:, payload_bytes:payload_bytes + L].bool()
        recv_slots = _from_bytes(recv1[:, payload_bytes + L:], torch.int32, (recv1.shape[0], L))
        dest_local, forward_row = routing.hop2_send_order(recv_mask)
        send2 = torch.cat([recv1[forward_row, :payload_bytes],
                           _as_bytes(recv_slots[forward_row, dest_local].view(-1, 1))], dim=1)
        recv2 = self._all_to_all(send2, split["hop2_send"], split["hop2_recv"], self.node_group, "dispatch")

        # (4) every row to its final position, padded to num_worst_tokens rows
        hop2_slot = _from_bytes(recv2[:, payload_bytes:], torch.int32, (recv2.shape[0],)).long()
        rows = max(num_recv, num_worst_tokens)
        take = RowUnpacker(recv2, rows, hop2_slot).take

        recv_x = take(x.dtype, x.shape[1], 0)
        recv_scales = take(x_scales.dtype, x_scales.shape[1], 0) if x_scales is not None else None
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            global_idx = take(torch.int64, topk_idx.shape[1], -1)
            experts_per_rank = num_tokens_per_expert.numel() // self.num_ranks
            local = global_idx - rank * experts_per_rank
            recv_topk_idx = torch.where((global_idx >= 0) & (local >= 0) & (local < experts_per_rank), local, -1)
            if topk_weights is not None:
                weights = take(topk_weights.dtype, topk_weights.shape[1], 0)
                recv_topk_weights = torch.where(recv_topk_idx >= 0, weights, torch.zeros_like(weights))
        recv_src_idx = take(torch.int32, 1, -1).view(-1)
        if handle is None:
            handle = InternodeHandle(rank_prefix, is_token_in_rank, recv_src_idx, is_token_in_node, counts,
                                     node_counts, hop1_token, forward_row, hop2_slot)
        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle

    # -- combine -----------------------------------------------------------------------------------
    def combine(self, *, x, handle: InternodeHandle, topk_weights, bias, config=None):
        topo, rank = self.topology, self.rank
        split = routing.splits(handle.counts, handle.node_counts, topo, rank)
        H, dtype = x.shape[1], x.dtype
        K = topk_weights.shape[1] if topk_weights is not None else 0
        self.headers.exchange("combine", dict(hidden=H, x=_describe(x)[:1], topk_weights=_describe(topk_weights)),
                              flows=self._flows(split, back=True))

        def pack(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
            parts = [_as_bytes(rows.to(dtype))] + ([_as_bytes(weights.float())] if K else [])
            return torch.cat(parts, dim=1)

        def unpack(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            hb = H * x.element_size()
            rows = _from_bytes(raw[:, :hb], dtype, (raw.shape[0], H)).float()
            return rows, (_from_bytes(raw[:, hb:], torch.float32, (raw.shape[0], K)) if K else None)

        def reduce(index: torch.Tensor, size: int, raw: torch.Tensor):
            rows, weights = unpack(raw)
            acc = torch.zeros(size, H, dtype=torch.float32, device=x.device).index_add_(0, index, rows)
            acc_w = torch.zeros(size, K, dtype=torch.float32, device=x.device).index_add_(0, index, weights) \
                if K else None
            return acc, acc_w

        # NVLink hop back: each received row to the forwarder it came from, summed there per network row
        slot = handle.hop2_slot
        back2 = self._all_to_all(pack(x[slot], topk_weights[slot] if K else None), split["hop2_recv"],
                                 split["hop2_send"], self.node_group, "combine")
        num_rows1 = sum(split["hop1_recv"])
        partial, partial_w = reduce(handle.forward_row, num_rows1, back2)
        # network hop back: one partial sum per (token, node), summed at the source
        back1 = self._all_to_all(pack(partial, partial_w), split["hop1_recv"], split["hop1_send"], self.rail_group,
                                 "combine")
        acc, acc_w = reduce(handle.hop1_token, handle.num_tokens, back1)
        for b in bias:
            acc += b.float()
        combined_w = acc_w.to(topk_weights.dtype) if K else None
        return acc.to(dtype), combined_w

    def check_handle(self, handle) -> InternodeHandle:
        if not isinstance(handle, InternodeHandle):
            raise TypeError("handle: expected the handle returned by this Buffer's dispatch (an InternodeHandle: "
                            "the group spans several nodes)")
        if handle.rank_prefix_matrix.shape != (self.num_ranks, self.num_ranks):
            raise ValueError(f"handle: made for {handle.rank_prefix_matrix.shape[0]} ranks, this group has "
                             f"{self.num_ranks}")
        return handle

    def raise_if_failed(self) -> None:
        pass

    def destroy(self) -> None:
        pass
