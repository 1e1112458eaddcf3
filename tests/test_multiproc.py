"""epkern.testing.multiproc on CPU: results in rank order, a gloo group that gathers, and failures
(an exception, a dead process, a hang) reported with the rank instead of hanging the run."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from epkern.testing import multiproc


def _gather_ranks(rank, num_ranks, base):
    parts = multiproc.all_gather(torch.tensor([base + rank, 10 * rank]), dist.group.WORLD)
    return torch.stack(parts), dist.get_backend(), torch.cuda.is_initialized()


def test_cpu_group_gathers_and_returns_in_rank_order():
    out = multiproc.run(_gather_ranks, 3, "cpu", 100, timeout_s=120)
    want = torch.tensor([[100, 0], [101, 10], [102, 20]])
    assert all(torch.equal(parts, want) for parts, _, _ in out)
    assert {backend for _, backend, _ in out} == {"gloo"}
    assert not any(cuda for _, _, cuda in out)


def _env_at_setup(rank, num_ranks, name):
    return os.environ.get(name), dist.get_world_size()


def test_env_is_set_in_every_rank_only():
    name = "EPKERN_TEST_MULTIPROC_ENV"
    out = multiproc.run(_env_at_setup, 2, "cpu", name, env={name: "7"}, timeout_s=120)
    assert out == [("7", 2)] * 2
    assert name not in os.environ
    with pytest.raises(TypeError, match="env"):
        multiproc.run(_sleep, 2, "cpu", env={name: 7})


def _fail_or_wait(rank, num_ranks):
    if rank == 0:
        raise ValueError("rank zero broke")
    if rank == 1:
        os._exit(3)
    time.sleep(600)   # rank 2 hangs: stopped once the others failed


def test_failures_name_the_rank_and_stop_the_rest():
    start = time.monotonic()
    with pytest.raises(multiproc.RankError) as info:
        multiproc.run(_fail_or_wait, 3, None, timeout_s=120, grace_s=1)
    failures = info.value.failures
    assert "ValueError: rank zero broke" in failures[0]
    assert "exited with code 3" in failures[1]
    assert "stopped" in failures[2]
    assert time.monotonic() - start < 60


def _sleep(rank, num_ranks):
    time.sleep(600)


def test_a_hang_times_out():
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\] did not finish"):
        multiproc.run(_sleep, 2, None, timeout_s=3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        multiproc.run(_sleep, 2, "mpi")
    with pytest.raises(ValueError, match="num_ranks"):
        multiproc.run(_sleep, 0, "cpu")
