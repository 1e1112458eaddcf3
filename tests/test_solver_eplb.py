"""EPLB placement: structural properties, optimality of replication, policies, errors, CPU/GPU parity."""
import itertools

import pytest
import torch

from epkern.solver import rebalance_experts
from epkern.solver.eplb import balanced_packing, replicate_experts

CONFIGS = [  # (logical experts, replicas, groups, nodes, gpus): hierarchical and global (groups % nodes != 0)
    (256, 288, 8, 4, 32), (256, 256, 8, 1, 8), (64, 80, 8, 2, 16), (60, 64, 6, 4, 16), (24, 32, 3, 2, 8),
]


def loads(layers, n, seed, skew=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, n, generator=gen) * skew).exp() * 1000


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "e{}_r{}_g{}_n{}_p{}".format(*c))
def test_placement_properties(cfg):
    num_log, num_rep, groups, nodes, gpus = cfg
    weight = loads(3, num_log, seed=num_rep)
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_rep, groups, nodes, gpus)
    assert phy2log.shape == (3, num_rep) and logcnt.shape == (3, num_log) and log2phy.shape[:2] == (3, num_log)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == num_rep).all()
    for layer in range(3):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=num_log), logcnt[layer])
        for e in range(num_log):
            slots = log2phy[layer, e]
            valid = slots[slots >= 0]
            assert valid.numel() == int(logcnt[layer, e]) and (phy2log[layer, valid] == e).all()
            assert (slots[valid.numel():] == -1).all()
        if num_rep > num_log:
            assert logcnt[layer, weight[layer].argmax()] >= 2  # the hottest expert is replicated
    # balance: no GPU carries more than the identity placement's busiest one
    per_copy = weight.gather(1, phy2log) / logcnt.gather(1, phy2log)
    placed = per_copy.reshape(3, gpus, -1).sum(-1)
    identity = torch.nn.functional.pad(weight, (0, num_rep - num_log)).reshape(3, gpus, -1).sum(-1)
    assert (placed.max(-1).values <= identity.max(-1).values * (1 + 1e-9)).all()


def test_hierarchical_keeps_groups_within_nodes():
    num_log, num_rep, groups, nodes, gpus = 64, 80, 8, 2, 16
    weight = loads(2, num_log, seed=5)
    phy2log, _, _ = rebalance_experts(weight, num_rep, groups, nodes, gpus)
    group_of = phy2log // (num_log // groups)
    node_of = torch.arange(num_rep) // (num_rep // nodes)
    for layer in range(2):
        for g in range(groups):  # every copy of a group's experts on one node, 4 groups per node
            assert len(set(node_of[group_of[layer] == g].tolist())) == 1
        for n in range(nodes):
            assert len(set(group_of[layer][node_of == n].tolist())) == groups // nodes


def test_replication_minimizes_the_largest_load_per_copy():
    weight = loads(4, 5, seed=2, skew=2.0).double()
    for layer in range(4):
        _, _, logcnt = replicate_experts(weight[layer: layer + 1], 9)
        got = (weight[layer] / logcnt[0]).max()
        best = min((weight[layer] / torch.tensor(c)).max() for c in itertools.product(range(1, 6), repeat=5)
                   if sum(c) == 9)
        assert float(got) == pytest.approx(float(best))


def test_balanced_packing_fills_packs_evenly_heaviest_first():
    weight = torch.tensor([[9.0, 1.0, 8.0, 2.0, 7.0, 3.0]])
    pack, rank = balanced_packing(weight, 2)
    assert pack.tolist() == [[0, 1, 1, 0, 1, 0]] and torch.bincount(pack[0]).tolist() == [3, 3]
    assert rank.tolist() == [[0, 2, 0, 2, 1, 1]]  # 9, 8, 7->1, 3->0, 2->0, 1->1


def test_eplb_errors_are_clear():
    w = torch.ones(2, 16)
    with pytest.raises(ValueError, match=r"num_replicas=12 must be >= the number of logical experts 16"):
        rebalance_experts(w, 12, 4, 1, 4)
    with pytest.raises(ValueError, match=r"num_replicas=18 must be a multiple of num_gpus=4"):
        rebalance_experts(w, 18, 4, 1, 4)
    with pytest.raises(ValueError, match=r"num_gpus=4 must be a multiple of num_nodes=3"):
        rebalance_experts(w, 16, 3, 3, 4)
    with pytest.raises(ValueError, match=r"num_groups=5 must divide the number of logical experts 16"):
        rebalance_experts(w, 16, 5, 1, 4)
    with pytest.raises(ValueError, match=r"weight: expected \[layers, num_logical_experts\]"):
        rebalance_experts(torch.ones(16), 16, 4, 1, 4)
    with pytest.raises(ValueError, match=r"weight: loads must be finite and >= 0"):
        rebalance_experts(-w, 16, 4, 1, 4)
    with pytest.raises(ValueError, match=r"num_gpus=0: expected a positive int"):
        rebalance_experts(w, 16, 4, 1, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "e{}_r{}_g{}_n{}_p{}".format(*c))
def test_gpu_placement_equals_cpu(cfg):
    num_log, num_rep, groups, nodes, gpus = cfg
    weight = loads(3, num_log, seed=num_rep)
    cpu = rebalance_experts(weight, num_rep, groups, nodes, gpus)
    gpu = rebalance_experts(weight.cuda(), num_rep, groups, nodes, gpus)
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and torch.equal(a, b.cpu())


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_non_finite_or_negative_loads_are_rejected(bad):
    """inf gave a placement that is not a permutation, NaN gave one expert every replica (issue 18)."""
    weight = loads(2, 16, seed=3)
    weight[1, 5] = bad
    with pytest.raises(ValueError, match=r"weight: loads must be finite and >= 0; entry \(1, 5\)"):
        rebalance_experts(weight, 32, 4, 2, 8)
    with pytest.raises(ValueError, match="finite"):
        rebalance_experts(weight.half(), 32, 4, 2, 8)


def test_empty_inputs_work_or_raise_clearly():
    phy2log, log2phy, logcnt = rebalance_experts(torch.empty(0, 16), 32, 4, 2, 8)
    assert phy2log.shape == (0, 32) and log2phy.shape == (0, 16, 1) and logcnt.shape == (0, 16)
    with pytest.raises(ValueError, match="at least one logical expert"):
        rebalance_experts(torch.empty(2, 0), 8, 1, 1, 8)
    # integer loads, zeros included, are fine
    phy2log, _, logcnt = rebalance_experts(torch.zeros(1, 16, dtype=torch.int64), 32, 4, 2, 8)
    assert torch.equal(torch.bincount(phy2log[0], minlength=16), logcnt[0])


def test_a_million_replicas_is_rejected_at_once():
    with pytest.raises(ValueError, match=r"num_replicas=1048576: at most 16384"):
        rebalance_experts(loads(1, 256, seed=1), 1 << 20, 8, 1, 8)
