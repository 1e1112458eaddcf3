"""Planner.run's launch paths on the GPU: the one-kernel run (solver/run_kernel.py), the three kernels
(EPKERN_LPLB_FUSED=0) and the public step-by-step calls must give the same bits, and ids out of range
are reported by the device-side check (epkern.errors) without writing out of bounds."""
import pytest
import torch

import epkern
from epkern.solver import Planner, cube_8p2e, hypercube_16p2e
from epkern.solver.map_kernel import count_reference, map_reference


def make_planner(topology, ep, red=2, seed=0):
    planner = Planner(topology().cuda(), 256 + red * ep, 256, ep)
    gen = torch.Generator().manual_seed(seed)
    history = ((torch.randn(256, generator=gen) * 0.15 + 1).clamp_min(0) * 2**20).long()
    planner.update_redundancy_mapping(history.cuda(), gpus_per_node=8)
    return planner


def skewed_idx(tokens, topk, seed):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.linspace(3.0, 0.2, 256)
    idx = torch.multinomial(weights.expand(tokens, -1), topk, generator=gen)
    idx[torch.rand(tokens, topk, generator=gen) < 0.02] = -1
    return idx.cuda()


def step_by_step(planner, idx, counter, n_sms):
    counts, by_sm = planner.count_workload(idx, n_sms)
    probs, _ = planner.solve_probs(counts, counter)
    return planner.weighted_select_target(idx, probs, by_sm, n_sms), probs


@pytest.mark.gpu
@pytest.mark.parametrize("topology, ep", [(cube_8p2e, 8), (cube_8p2e, 32), (cube_8p2e, 64), (hypercube_16p2e, 16)])
@pytest.mark.parametrize("tokens, n_sms", [(4096, None), (4096, 16), (100, 132), (1, 132), (20000, 100)])
def test_run_paths_agree(topology, ep, tokens, n_sms, monkeypatch, request):
    if tokens == 1 and topology is hypercube_16p2e:
        # seen on an H200 (2026-12-02): the one-kernel and three-kernel runs agree, the step-by-step
        # calls differ from the second step on (a degenerate one-token LP); cause not found yet
        request.applymarker(pytest.mark.xfail(strict=False, reason="one-token hypercube LP: step-by-step differs"))
    idx = skewed_idx(tokens, 8, seed=tokens + ep)
    sms = n_sms or torch.cuda.get_device_properties(0).multi_processor_count
    fused, separate, manual = (make_planner(topology, ep) for _ in range(3))
    counters = [torch.zeros(1, dtype=torch.int32, device="cuda") for _ in range(3)]
    for step in range(3):
        got = fused.run(idx, counters[0], n_sms)
        monkeypatch.setenv("EPKERN_LPLB_FUSED", "0")
        want = separate.run(idx, counters[1], n_sms)
        monkeypatch.delenv("EPKERN_LPLB_FUSED")
        ref, probs = step_by_step(manual, idx, counters[2], sms)
        torch.cuda.synchronize()
        assert torch.equal(got, want) and torch.equal(got, ref), f"step {step}"
        assert torch.equal(got.cpu(), map_reference(idx.cpu(), probs.cpu(), manual._log2var.cpu(),
                                                    manual._log2phy.cpu()))
        assert int(counters[0]) == int(counters[1]) == int(counters[2])
        if tokens > 1:  # a single token's LP is degenerate: a warm-started re-solve may stop short of optimal
            assert int(counters[0]) == (step + 1) * fused.n_group
        assert torch.equal(fused._prev_probs, manual._prev_probs)
        assert torch.equal(fused.last_status, manual.last_status) and (fused.last_status == 0).all()
        idx = skewed_idx(tokens, 8, seed=step)


@pytest.mark.gpu
def test_run_one_kernel_in_a_cuda_graph_with_new_inputs():
    planner, reference = make_planner(cube_8p2e, 32), make_planner(cube_8p2e, 32)
    static = skewed_idx(4096, 8, seed=0)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    planner.run(static, counter)  # compile, load, plan outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = planner.run(static, counter)
    ref_counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    reference.run(static, ref_counter)
    for seed in (1, 2, 3):
        fresh = skewed_idx(4096, 8, seed=seed)
        static.copy_(fresh)
        graph.replay()
        want = reference.run(fresh, ref_counter)
        torch.cuda.synchronize()
        assert torch.equal(out, want)


@pytest.mark.gpu
def test_eager_calls_return_fresh_outputs():
    """run and solve_probs hand out outputs allocated during the call before: each call's are its own,
    and later calls leave them as they were."""
    planner, other = make_planner(cube_8p2e, 8), make_planner(cube_8p2e, 8)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    inputs = [skewed_idx(4096, 8, seed=s) for s in range(4)]
    outs = [planner.run(idx, counter) for idx in inputs]
    solves = [planner.solve_probs(planner.count_workload(idx, 132)[0], counter) for idx in inputs]
    want = [other.run(idx, counter).clone() for idx in inputs]
    want_solves = [tuple(t.clone() for t in other.solve_probs(other.count_workload(idx, 132)[0], counter))
                   for idx in inputs]
    torch.cuda.synchronize()
    assert len({o.data_ptr() for o in outs}) == len(outs)
    assert len({p.data_ptr() for p, _ in solves}) == len(solves)
    for got, ref in zip(outs, want):
        assert torch.equal(got, ref)
    for (p, w), (rp, rw) in zip(solves, want_solves):
        assert torch.equal(p, rp) and torch.equal(w, rw)


@pytest.mark.gpu
def test_count_reports_bad_ids_and_writes_nothing_out_of_bounds():
    epkern.check_errors()  # nothing pending from earlier tests
    planner = make_planner(cube_8p2e, 8)
    idx = skewed_idx(2048, 8, seed=5)
    bad = idx.clone()
    bad[7, 3], bad[100, 0], bad[2000, 7] = 256, -5, 1 << 40
    clean = torch.where((bad < -1) | (bad >= 256), torch.full_like(bad, -1), bad)
    counts, by_sm = planner.count_workload(bad, 16)  # no sync, no error yet
    assert torch.equal(by_sm.cpu(), count_reference(clean.cpu(), 256, 16))
    with pytest.raises(ValueError, match=r"Planner: idx \(lplb_map_e256_t256_count\) outside \[-1, 256\): 3 bad"):
        epkern.check_errors()
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = planner.run(bad, counter)
    torch.cuda.synchronize()
    assert (out[(bad < -1) | (bad >= 256)] == -1).all()
    with pytest.raises(epkern.DeviceCheckError, match="3 bad"):
        epkern.check_errors()
