"""LPLB's Planner.init_from_deep_ep(buffer) and its device rule (a topology on any device moves to the
planner's device, the GPU by default as in LPLB)."""
import pytest
import torch
import torch.distributed as dist

from epkern.solver import Planner, cube_8p2e
from epkern.testing import multiproc


def _workload(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return ((torch.randn(256, generator=gen) * 0.3 + 1).clamp_min(0) * 2**12).int()


def _worker(rank, world):
    import epkern

    # the group: gloo on CPU, set up by multiproc.run
    buffer = epkern.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, backend="torch")
    planner = Planner(cube_8p2e(), 256 + 64, 256, ep_size=32, device="cpu")   # no group: no all-reduce
    with pytest.raises(ValueError, match="ep_size=32"):
        planner.init_from_deep_ep(buffer)   # 2 ranks in the buffer's group, 32 in the planner
    planner.ep_size = world   # as if the two processes were the 32 ranks (the solve is the same)
    planner.init_from_deep_ep(buffer)
    planner.ep_size = 32
    planner.init_from_deep_ep(buffer)  # again: nothing happens, as in LPLB
    assert planner.deep_ep_initialized and planner.ep_group is buffer.group
    probs, _ = planner.solve_probs(_workload(rank), torch.zeros(1, dtype=torch.int32))
    buffer.destroy()
    return probs


def test_init_from_deep_ep_all_reduces_over_the_buffers_group():
    results = multiproc.run(_worker, 2, "cpu")
    single = Planner(cube_8p2e(), 256 + 64, 256, ep_size=32, device="cpu")
    expected, _ = single.solve_probs(_workload(0) + _workload(1), torch.zeros(1, dtype=torch.int32))
    for r in range(2):
        assert torch.equal(results[r], expected)


def test_default_device_follows_lplb():
    planner = Planner(cube_8p2e(), 256 + 64, 256, ep_size=32)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert planner.device.type == want and planner.r2o.device.type == want and planner.phy2log.device.type == want


@pytest.mark.gpu
def test_cpu_topology_runs_on_the_gpu():
    """LPLB's usage: the topology helpers give CPU tensors, the batches are CUDA tensors."""
    planner = Planner(cube_8p2e(), 256 + 64, 256, ep_size=32)
    idx = torch.randint(-1, 256, (512, 8), device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = planner.run(idx, counter)
    assert out.shape == idx.shape and out.is_cuda and int(counter) == planner.n_group
    on_cpu = Planner(cube_8p2e().cuda(), 256 + 64, 256, ep_size=32, device="cpu")
    assert on_cpu.r2o.device.type == "cpu"
