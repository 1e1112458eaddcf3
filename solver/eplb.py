"""EPLB: place logical experts and their replicas on GPUs from historical loads (DeepSeek's policy).

`rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)` returns
`(phy2log [L, R], log2phy [L, E, max_copies] (-1 padded), logcnt [L, E])`, all int64 on
weight's device. Hierarchical policy when the expert groups divide evenly over the nodes:
pack groups onto nodes (balanced packing), replicate inside each node by giving one more copy
to the expert with the largest load per copy, then pack the node's physical experts onto its
GPUs (balanced packing). Otherwise the same with one group and one node. Every step is a
torch op batched over layers (and nodes), so CPU and CUDA tensors give the same placement.
"""
from __future__ import annotations

import torch

# The placement loops over physical slots in Python (a few torch ops per slot, batched over
# layers): 16384 slots take seconds; DeepSeek-V3 deployments use a few hundred.
MAX_REPLICAS = 1 << 14


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the n items of each row into num_packs packs of n / num_packs items each, heaviest
    first into the lightest pack that still has room (ties: the lowest pack index).

    weight [X, n] -> (pack_index [X, n], rank_in_pack [X, n]) int64."""
    rows, n = weight.shape
    per_pack = n // num_packs
    device = weight.device
    if per_pack == 1:
        pack = torch.arange(n, device=device).expand(rows, n).contiguous()
        return pack, torch.zeros_like(pack)
    order = torch.sort(weight.double(), dim=-1, descending=True, stable=True).indices
    pack_index = torch.empty(rows, n, dtype=torch.int64, device=device)
    rank_in_pack = torch.empty_like(pack_index)
    pack_weight = torch.zeros(rows, num_packs, dtype=torch.float64, device=device)
    pack_items = torch.zeros(rows, num_packs, dtype=torch.int64, device=device)
    full = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    for i in range(n):
        item = order[:, i: i + 1]
        pack = torch.where(pack_items < per_pack, pack_weight, full).argmin(dim=-1, keepdim=True)
        pack_index.scatter_(1, item, pack)
        rank_in_pack.scatter_(1, item, pack_items.gather(1, pack))
        pack_weight.scatter_add_(1, pack, weight.double().gather(1, item))
        pack_items.scatter_add_(1, pack, torch.ones_like(pack))
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each extra slot to the expert with the largest load per copy (ties: lowest id).

    weight [X, num_log] -> (phy2log [X, num_phy], replica rank [X, num_phy], logcnt [X, num_log])."""
    rows, num_log = weight.shape
    device = weight.device
    phy2log = torch.arange(num_phy, device=device).repeat(rows, 1)
    replica = torch.zeros(rows, num_phy, dtype=torch.int64, device=device)
    logcnt = torch.ones(rows, num_log, dtype=torch.int64, device=device)
    w = weight.double()
    for slot in range(num_log, num_phy):
        best = (w / logcnt).argmax(dim=-1, keepdim=True)
        phy2log[:, slot: slot + 1] = best
        replica[:, slot: slot + 1] = logcnt.gather(1, best)
        logcnt.scatter_add_(1, best, torch.ones_like(best))
    return phy2log, replica, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm).contiguous())
    return inv


def _hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    log_per_node = num_log // num_nodes
    device = weight.device

    # 1. groups -> nodes; relabel logical experts so each node's experts are contiguous ("mlog")
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    first_mlog = (group_node * groups_per_node + group_rank) * group_size
    log2mlog = (first_mlog.unsqueeze(-1) + torch.arange(group_size, device=device)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # 2. replicate within each node: rows are (layer, node)
    mlog_load = weight.gather(-1, mlog2log).reshape(-1, log_per_node)
    phy2mlog, phy_replica, mlogcnt = replicate_experts(mlog_load, num_phy // num_nodes)

    # 3. the node's physical experts -> its GPUs, by load per copy
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    gpu, rank_in_gpu = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * phy_per_gpu + rank_in_gpu)

    # back to global ids: physical slot order is (node, gpu, rank in gpu)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    node_offset = torch.arange(0, num_log, log_per_node, device=device).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(layers, num_nodes, -1) + node_offset).flatten(-2)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    replica = phy_replica.gather(-1, pphy2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return phy2log, replica, logcnt


def _check_args(weight, num_replicas, num_groups, num_nodes, num_gpus) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [layers, num_logical_experts], got shape {tuple(weight.shape)}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(f"weight: dtype {weight.dtype} not supported; expected a real number tensor")
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
    if num_replicas > MAX_REPLICAS:
        raise ValueError(f"num_replicas={num_replicas}: at most {MAX_REPLICAS} physical experts are supported")
    num_log = weight.shape[1]
    if num_log < 1:
        raise ValueError("weight: needs at least one logical expert")
    if num_replicas < num_log:
        raise ValueError(f"num_replicas={num_replicas} must be >= the number of logical experts {num_log}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_log % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of logical experts {num_log}")
    check_loads("weight", weight)


def check_loads(name: str, weight: torch.Tensor) -> None:
    """Loads must be finite and >= 0: an inf or NaN load breaks the greedy packing (a NaN sorts
    first and takes every replica; inf / copies stays inf, so slots are never filled)."""
    if weight.numel() == 0:
        return
    w = weight if weight.is_floating_point() else weight.double()
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{name}: loads must be finite and >= 0; entry {first} is {w[first].item()}")


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place num_replicas physical experts (the logical ones plus copies) on num_gpus GPUs.

    Args:
        weight: [layers, num_logical_experts] load statistics (any real dtype, finite, >= 0), CPU or
            CUDA; zero layers give empty tables.
        num_replicas: physical experts, a multiple of num_gpus, >= num_logical_experts, <= MAX_REPLICAS.
        num_groups: expert groups (of the router's group-limited routing).
        num_nodes: server nodes (the fast intra-node network); num_gpus is a multiple of it.
        num_gpus: GPUs in total.
    Returns:
        phy2log [layers, num_replicas]: the logical expert of each physical slot (GPU-major);
        log2phy [layers, E, max_copies]: the physical slots of each logical expert, -1 padded;
        logcnt [layers, E]: copies per logical expert. All int64 on weight's device.
    """
    _check_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    layers, num_log = weight.shape
    weight = weight.double()
    if layers == 0:  # no layers: empty tables, one copy per expert
        empty = torch.empty(0, num_replicas, dtype=torch.int64, device=weight.device)
        return (empty, torch.empty(0, num_log, 1, dtype=torch.int64, device=weight.device),
                torch.empty(0, num_log, dtype=torch.int64, device=weight.device))
    if num_groups % num_nodes == 0:
        phy2log, replica, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_copies = int(logcnt.max())
    log2phy = torch.full((layers, num_log * max_copies), -1, dtype=torch.int64, device=weight.device)
    slots = torch.arange(num_replicas, device=weight.device).expand(layers, -1).contiguous()
    log2phy.scatter_(1, phy2log * max_copies + replica, slots)
    return phy2log, log2phy.view(layers, num_log, max_copies), logcnt
