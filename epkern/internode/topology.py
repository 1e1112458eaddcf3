"""Which ranks of a process group share a node.

Ranks are laid out node by node (global rank = node * ranks_per_node + local rank), as torchrun
and every launcher DeepEP supports do. The count of ranks per node comes from, in order:
the `ranks_per_node` argument, `EPKERN_RANKS_PER_NODE` (1 treats each GPU as its own node, for
tests on one machine), `LOCAL_WORLD_SIZE` (set by torchrun) when every rank agrees on it, and
last the host names.
"""
from __future__ import annotations

import dataclasses
import os
import socket

import torch.distributed as dist

from epkern.codegen import knobs


@dataclasses.dataclass(frozen=True)
class NodeTopology:
    num_ranks: int
    ranks_per_node: int

    def __post_init__(self):
        if self.num_ranks < 1 or self.ranks_per_node < 1 or self.num_ranks % self.ranks_per_node:
            raise ValueError(f"{self.num_ranks} ranks cannot be split into nodes of {self.ranks_per_node} ranks")

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def node_ranks(self, node: int) -> list[int]:
        """The ranks of one node (the NVLink hop)."""
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def rail_ranks(self, local: int) -> list[int]:
        """The ranks with one local index, one per node (the network hop)."""
        return list(range(local, self.num_ranks, self.ranks_per_node))


def _positive_int_env(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r}: expected a positive whole number")
    return int(raw)


def detect_topology(group, ranks_per_node: int | None = None) -> NodeTopology:
    """The node layout of `group`, agreed by every rank (a collective: every rank must call it)."""
    world = dist.get_world_size(group)
    if ranks_per_node is None:
        ranks_per_node = knobs.ranks_per_node()
    if ranks_per_node is None:
        mine = (socket.gethostname(), _positive_int_env("LOCAL_WORLD_SIZE"))
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
        local_sizes = {size for _, size in everyone}
        if len(local_sizes) == 1 and None not in local_sizes:
            ranks_per_node = local_sizes.pop()
        else:
            hosts = [host for host, _ in everyone]
            ranks_per_node = hosts.count(hosts[0])
            expected = [hosts[r - r % ranks_per_node] for r in range(world)] if world % ranks_per_node == 0 else None
            if expected != hosts or len(set(hosts)) * ranks_per_node != world:
                raise ValueError(f"ranks are not laid out node by node with equal counts (hosts by rank: {hosts}); "
                                 "set EPKERN_RANKS_PER_NODE or LOCAL_WORLD_SIZE")
    if world % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} does not divide the group's {world} ranks")
    return NodeTopology(world, ranks_per_node)
