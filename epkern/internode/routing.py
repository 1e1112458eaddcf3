"""The two-hop route of normal-mode dispatch across nodes, as plain tensor math.

A token of source rank s = (node a, local i) that reaches ranks on node n crosses the network
once, to the rank of node n with the same local index i (its "forwarder", on s's rail), carrying
the mask of node n's local ranks it reaches. The forwarder sends it on over NVLink to each of them.
Every split size of both hops follows from two count tables that every rank holds after one
all-gather: counts[s, d] (tokens s sends to rank d) and node_counts[s, n] (tokens s sends to node n).
"""
from __future__ import annotations

import torch

from .topology import NodeTopology


def tokens_in_node(is_token_in_rank: torch.Tensor, topo: NodeTopology) -> torch.Tensor:
    """[T, R] bool -> [T, N] bool: does the token reach any rank of node n."""
    T = is_token_in_rank.shape[0]
    return is_token_in_rank.view(T, topo.num_nodes, topo.ranks_per_node).any(dim=2)


def hop1_send_order(is_token_in_node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination node, token) of every network row, node-major then token order."""
    pairs = is_token_in_node.t().nonzero()
    return pairs[:, 0], pairs[:, 1]


def hop2_send_order(local_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """At a forwarder: (local destination, network row) of every NVLink row, destination-major."""
    pairs = local_mask.t().nonzero()
    return pairs[:, 0], pairs[:, 1]


def splits(counts: torch.Tensor, node_counts: torch.Tensor, topo: NodeTopology, rank: int) -> dict[str, list[int]]:
    """Split sizes (host lists) of both hops at `rank`, each list in its group's rank order.

    hop1_send[n]: rows to node n's forwarder; hop1_recv[j]: rows from the j-th node's rank of our
    rail; hop2_send[l]: rows we forward to local rank l; hop2_recv[l]: rows local rank l forwards
    to us (those whose source shares l's rail)."""
    node, local = topo.node_of(rank), topo.local_of(rank)
    rail = topo.rail_ranks(local)
    mine = topo.node_ranks(node)
    return dict(
        hop1_send=node_counts[rank].tolist(),
        hop1_recv=[int(node_counts[s, node]) for s in rail],
        hop2_send=[int(counts[rail, d].sum()) for d in mine],
        hop2_recv=[int(counts[topo.rail_ranks(topo.local_of(f)), rank].sum()) for f in mine],
    )
