"""Normal mode across nodes on CPU: the two-hop routing against a brute-force enumeration of
routes, and a 4-process gloo round trip (2 processes per "node") that must equal single-node mode."""
import random

import pytest
import torch
import torch.distributed as dist

from epkern.internode import NodeTopology
from epkern.internode import routing
from epkern.testing import multiproc


def _random_layouts(R: int, T: int, gen: torch.Generator) -> list[torch.Tensor]:
    """is_token_in_rank [T, R] of every rank, some tokens reaching no rank at all."""
    return [torch.rand(T, R, generator=gen) < 0.35 for _ in range(R)]


@pytest.mark.parametrize("num_nodes,per_node", [(2, 2), (3, 2), (2, 4), (4, 1), (1, 4)])
def test_splits_match_brute_force_routes(num_nodes, per_node):
    """Each (source s, token t, destination d) travels s -> forwarder (node(d), local(s)) -> d."""
    topo = NodeTopology(num_nodes * per_node, per_node)
    R = topo.num_ranks
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    layouts = _random_layouts(R, 37, gen)
    counts = torch.stack([m.sum(0) for m in layouts]).long()
    node_counts = torch.stack([routing.tokens_in_node(m, topo).sum(0) for m in layouts]).long()
    network = {}   # (s, forwarder) -> set of tokens
    nvlink = {}    # (forwarder, d) -> count
    for s, m in enumerate(layouts):
        for t, d in m.nonzero().tolist():
            f = topo.node_ranks(topo.node_of(d))[topo.local_of(s)]
            network.setdefault((s, f), set()).add(t)
            nvlink[(f, d)] = nvlink.get((f, d), 0) + 1
    for r in range(R):
        got = routing.splits(counts, node_counts, topo, r)
        rail = topo.rail_ranks(topo.local_of(r))
        assert rail[topo.node_of(r)] == r
        assert got["hop1_send"] == [len(network.get((r, f), ())) for f in rail]
        assert got["hop1_recv"] == [len(network.get((s, r), ())) for s in rail]
        node = topo.node_ranks(topo.node_of(r))
        assert got["hop2_send"] == [nvlink.get((r, d), 0) for d in node]
        assert got["hop2_recv"] == [nvlink.get((f, r), 0) for f in node]


def test_send_orders_are_destination_major_then_token():
    mask = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    node, token = routing.hop1_send_order(mask)
    assert node.tolist() == [0, 0, 1, 1] and token.tolist() == [0, 1, 1, 2]


def test_topology_rejects_uneven_nodes():
    with pytest.raises(ValueError, match="nodes of 3"):
        NodeTopology(8, 3)


def _worker(rank, world, per_node, seed):
    from epkern.internode import HierarchicalTorchBackend, detect_topology
    from epkern.layout import get_dispatch_layout
    from epkern.normal.torch_backend import TorchBackend

    # the group (gloo, CPU) and EPKERN_RANKS_PER_NODE come from multiproc.run
    topo = detect_topology(dist.group.WORLD)
    assert (topo.num_nodes, topo.ranks_per_node) == (world // per_node, per_node)
    hier = HierarchicalTorchBackend(dist.group.WORLD, rank, world, topo)
    flat = TorchBackend(dist.group.WORLD, rank, world)
    gen = torch.Generator().manual_seed(seed * 101 + rank)
    E, K, H = 8 * world, 4, 64
    for T in (0, 1, 96):
        topk_idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else \
            torch.empty(0, K, dtype=torch.int64)
        if T:
            topk_idx[torch.rand(T, K, generator=gen) < 0.2] = -1
        weights = torch.randint(1, 5, (T, K), generator=gen).float() / 4
        # small integers: every sum is exact, so both paths must agree bit for bit
        x = torch.randint(-8, 9, (T, H), generator=gen).to(torch.bfloat16)
        scales = torch.rand(T, H // 32, generator=gen)
        per_rank, per_expert, in_rank = get_dispatch_layout(topk_idx, E, world)
        args = dict(x=x, x_scales=scales, topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                    is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, expert_alignment=4,
                    num_worst_tokens=0, handle=None)
        want = flat.dispatch(**args)
        got = hier.dispatch(**args)
        for w, g in zip(want[:4], got[:4]):
            assert torch.equal(w, g)
        assert want[4] == got[4]
        assert torch.equal(want[5].recv_src_idx, got[5].recv_src_idx)
        # cached layout: same rows again; padded: -1 beyond the real rows
        cached = hier.dispatch(**{**args, "handle": got[5], "topk_idx": None, "topk_weights": None})
        assert torch.equal(cached[0], got[0])
        padded = hier.dispatch(**{**args, "num_worst_tokens": got[0].shape[0] + 3})
        assert torch.equal(padded[0][:got[0].shape[0]], got[0]) and (padded[2][got[0].shape[0]:] == -1).all()
        # combine: every rank returns its rows scaled by its rank + 1
        y = (got[0].float() * (rank + 1)).to(torch.bfloat16)
        bias = (torch.ones(T, H, dtype=torch.bfloat16),)
        want_c = flat.combine(x=y, handle=want[5], topk_weights=want[3], bias=bias)
        got_c = hier.combine(x=y, handle=got[5], topk_weights=got[3], bias=bias)
        assert torch.equal(want_c[0], got_c[0]) and torch.equal(want_c[1], got_c[1])
        assert torch.equal(got_c[1], torch.where(topk_idx >= 0, weights, 0.0))
    _check_buffer_routes_across_nodes(rank, world, per_node, gen)


def _check_buffer_routes_across_nodes(rank, world, per_node, gen):
    """Buffer over a group spanning nodes: the two-hop backend, DeepEP's per-node counts, and
    internode_dispatch / internode_combine as dispatch / combine."""
    from epkern import Buffer

    buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20)
    assert buffer.backend == "torch-internode" and buffer.num_nodes == world // per_node
    E, T, H = 4 * world, 50, 32
    topk_idx = torch.stack([torch.randperm(E, generator=gen)[:3] for _ in range(T)])
    per_rank, per_node_counts, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    assert torch.equal(per_node_counts, in_rank.view(T, world // per_node, per_node).any(2).sum(0).int())
    x = torch.randn(T, H).to(torch.bfloat16)
    weights = torch.rand(T, 3)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.internode_dispatch(
        x, None, per_rank, per_node_counts, in_rank, per_expert, topk_idx, weights)
    again = buffer.dispatch(x, handle)[0]
    assert torch.equal(again, recv_x) and sum(counts) == int((recv_idx >= 0).sum())
    combined, _, _ = buffer.internode_combine(recv_x, handle)
    assert torch.allclose(combined.float(), x.float() * in_rank.sum(1, keepdim=True), rtol=2e-2, atol=1e-2)
    with pytest.raises(TypeError, match="InternodeHandle"):
        buffer.combine(recv_x, tuple(handle)[:6])
    with pytest.raises(ValueError, match="spans"):
        Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, backend="nvlink")


@pytest.mark.parametrize("world,per_node", [(4, 2), (4, 1)])
def test_two_hop_round_trip_equals_single_node_mode(world, per_node):
    seed = random.randrange(1 << 20)
    try:
        multiproc.run(_worker, world, "cpu", per_node, seed, env={"EPKERN_RANKS_PER_NODE": str(per_node)})
    except multiproc.RankError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc
