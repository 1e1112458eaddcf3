"""count_workload and weighted_select_target: torch definitions, their properties, and the kernels."""
import pytest
import torch

from epkern.codegen import jit
from epkern.solver import Planner, cube_8p2e
from epkern.solver.map_kernel import MapSpec, chunk_bounds, count_reference, map_reference

E, EP, RED = 256, 32, 2


def make_planner(device="cpu"):
    planner = Planner(cube_8p2e().to(device), E + RED * EP, E, EP, device=device)
    gen = torch.Generator().manual_seed(1)
    history = ((torch.randn(E, generator=gen) * 0.15 + 1).clamp_min(0) * 2**20).long()
    planner.update_redundancy_mapping(history, gpus_per_node=8)
    return planner


def random_idx(shape, seed, minus_one=0.1):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, shape, generator=gen)
    idx[torch.rand(shape, generator=gen) < minus_one] = -1
    return idx


def random_probs(planner, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(planner.n_group, planner.group_size, planner.num_redundants, generator=gen)


@pytest.mark.parametrize("shape, n_sms", [((4096, 8), 132), ((1000, 7), 5), ((1,), 3), ((0, 8), 4), ((300,), 1)])
def test_count_is_a_prefix_of_per_chunk_counts(shape, n_sms):
    idx = random_idx(shape, 0)
    by_sm = count_reference(idx, E, n_sms)
    assert by_sm.shape == (n_sms, E) and by_sm.dtype == torch.int32
    flat, bounds = idx.reshape(-1), chunk_bounds(idx.numel(), n_sms)
    running = torch.zeros(E, dtype=torch.int64)
    for b in range(n_sms):
        chunk = flat[bounds[b]: bounds[b + 1]]
        running += torch.bincount(chunk[chunk >= 0], minlength=E)
        assert torch.equal(by_sm[b].long(), running)
    assert bounds[0] == 0 and bounds[-1] == flat.numel() and all(b % 256 == 0 or b == flat.numel() for b in bounds)


def test_planner_count_workload_matches_bincount():
    planner = make_planner()
    idx = random_idx((4096, 8), 1)
    counts, by_sm = planner.count_workload(idx, 132)
    assert torch.equal(counts.long(), torch.bincount(idx[idx >= 0], minlength=E))
    assert torch.equal(counts, by_sm[-1])


@pytest.mark.parametrize("n_sms", [1, 7, 132])
def test_mapping_preserves_experts_and_splits_every_chunk(n_sms):
    planner = make_planner()
    idx = random_idx((16384, 8), 2)
    probs = random_probs(planner, 3)
    probs[0, 0, 0], probs[0, 1, 1] = 0.0, 1.0  # the edges of the range
    _, by_sm = planner.count_workload(idx, n_sms)
    mapped = planner.weighted_select_target(idx, probs, by_sm, n_sms)
    assert mapped.shape == idx.shape and mapped.dtype == torch.int64
    assert torch.equal(mapped == -1, idx == -1)
    valid = idx >= 0
    assert torch.equal(planner.phy2log.long()[mapped[valid]], idx[valid])  # original or its replica, never another
    # within one token of the solved share, per expert and per chunk
    log2phy, log2var = planner._log2phy.long(), planner._log2var.long()
    flat_idx, flat_map, bounds = idx.reshape(-1), mapped.reshape(-1), chunk_bounds(idx.numel(), n_sms)
    replicated = (log2var >= 0).nonzero().flatten()
    share = probs.reshape(-1).double()[log2var[replicated]]
    for b in range(n_sms):
        ids, out = flat_idx[bounds[b]: bounds[b + 1]], flat_map[bounds[b]: bounds[b + 1]]
        total = torch.bincount(ids[ids >= 0], minlength=E)[replicated].double()
        to_original = (ids >= 0) & (out == log2phy[ids.clamp_min(0), 0])
        kept = torch.bincount(ids[to_original], minlength=E)[replicated].double()
        assert ((kept - share * total).abs() < 1.0).all()
    # fixed experts always go to their only copy
    fixed = valid & (log2var[idx.clamp_min(0)] < 0)
    assert torch.equal(mapped[fixed], log2phy[idx[fixed], 0])


def test_mapping_is_deterministic_and_chunk_independent():
    planner = make_planner()
    idx = random_idx((4096, 8), 4)
    probs = random_probs(planner, 5)
    outs = []
    for n_sms in (1, 13, 132):
        _, by_sm = planner.count_workload(idx, n_sms)
        outs.append(planner.weighted_select_target(idx, probs, by_sm, n_sms))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(outs[0], map_reference(idx, probs, planner._log2var, planner._log2phy))


def test_map_errors_are_clear():
    planner = make_planner()
    idx = random_idx((64, 8), 6)
    probs = random_probs(planner, 7)
    _, by_sm = planner.count_workload(idx, 4)
    with pytest.raises(TypeError, match=r"idx: dtype torch.int32 not supported; expected torch.int64"):
        planner.count_workload(idx.int(), 4)
    with pytest.raises(ValueError, match=r"idx: value 256 out of range; allowed values are in \[-1, 256\)"):
        planner.count_workload(torch.full((4,), E), 4)
    with pytest.raises(ValueError, match=r"idx: value -2 out of range"):
        planner.weighted_select_target(torch.full((4,), -2), probs, by_sm, 4)
    with pytest.raises(ValueError, match=r"n_sms=0: expected an int >= 1"):
        planner.count_workload(idx, 0)
    with pytest.raises(ValueError, match=r"o_weight: dimension 2 is 1, expected 2"):
        planner.weighted_select_target(idx, probs[..., :1].contiguous(), by_sm, 4)
    with pytest.raises(TypeError, match=r"o_weight: dtype torch.float64"):
        planner.weighted_select_target(idx, probs.double(), by_sm, 4)
    with pytest.raises(ValueError, match=r"local_workload_by_sm: dimension 0 is 4, expected 8"):
        planner.weighted_select_target(idx, probs, by_sm, 8)
    with pytest.raises(ValueError, match=r"idx: must be contiguous"):
        planner.count_workload(idx.t(), 4)


@pytest.mark.parametrize("num_experts", [256, 288, 4096])
def test_map_kernels_compile_for_sm90a(num_experts):
    spec = MapSpec.for_experts(num_experts)
    assert len(jit.build(spec, "sm_90a").cubin) > 0


def test_map_spec_validation():
    with pytest.raises(ValueError, match=r"needs 131072 bytes of shared memory.*use threads=128"):
        MapSpec(num_experts=4096, threads=256)
    with pytest.raises(ValueError, match=r"MapSpec.num_experts=0: must be >= 1"):
        MapSpec(num_experts=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, n_sms", [((4096, 8), 132), ((16384, 8), 132), ((1000, 7), 5), ((1,), 3),
                                          ((0, 8), 4), ((4096, 8), 200), ((65536,), 78), ((65536,), 1024)])
def test_gpu_count_and_map_equal_references(shape, n_sms):
    planner = make_planner("cuda")
    idx = random_idx(shape, 8)
    probs = random_probs(planner, 9)
    counts, by_sm = planner.count_workload(idx.cuda(), n_sms)
    assert torch.equal(by_sm.cpu(), count_reference(idx, E, n_sms))
    assert torch.equal(counts.cpu(), by_sm[-1].cpu())
    mapped = planner.weighted_select_target(idx.cuda(), probs.cuda(), by_sm, n_sms)
    expected = map_reference(idx, probs, planner._log2var.cpu(), planner._log2phy.cpu())
    assert torch.equal(mapped.cpu(), expected)
    for _ in range(3):  # deterministic across runs, and the count ticket resets itself
        again = planner.weighted_select_target(idx.cuda(), probs.cuda(), planner.count_workload(idx.cuda(), n_sms)[1],
                                               n_sms)
        assert torch.equal(again, mapped)


@pytest.mark.gpu
def test_gpu_count_takes_the_grid_scan_when_every_block_fits():
    """132 blocks fit an H100/H200 at once: the blocks share the scan (count_grid, cooperative); 5000 do
    not: the last block scans (count). Both give the reference (test above)."""
    from epkern.solver import map_kernel

    spec = map_kernel.MapSpec.for_experts(E)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = map_kernel.launcher(spec, 0, "count", sms)
    assert grid.name.endswith("_count_grid") and grid.cooperative
    last = map_kernel.launcher(spec, 0, "count", 5000)
    assert last.name.endswith("_count") and not last.cooperative


@pytest.mark.gpu
def test_gpu_count_ticket_first_made_during_capture_is_zeroed_by_the_graph():
    """A count's state first allocated inside a capture may hold anything (recycled pool memory; for
    count_grid, its tagged rows and epoch): the graph zeroes it, and so does the first eager launch on
    that stream."""
    from epkern.solver import map_kernel

    idx = random_idx((4096, 8), 8).cuda()
    map_kernel.count_cuda(idx, E, 16)  # compile and load outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        by_sm = map_kernel.count_cuda(idx, E, 16)
    launch = map_kernel.launcher(map_kernel.MapSpec.for_experts(E), idx.device.index, "count", 16)
    ticket, _, _ = map_kernel.count_scratch(launch, idx.device, stream.cuda_stream, 16, E)
    for _ in range(2):
        ticket.tensor.fill_(7)  # garbage
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(by_sm.cpu(), count_reference(idx.cpu(), E, 16))
    ticket.tensor.fill_(7)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        eager = map_kernel.count_cuda(idx, E, 16)
    stream.synchronize()
    assert torch.equal(eager.cpu(), count_reference(idx.cpu(), E, 16)) and ticket.trusted
