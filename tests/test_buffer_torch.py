"""The portable backend (all_to_all_single) under gloo on CPU, with 2 and 4 processes: the full
option matrix of test_buffer_matrix.run_matrix plus input validation. Seeds differ per run."""
import random

import pytest
import torch
import torch.distributed as dist

from epkern.testing import multiproc


def _worker(rank, world, seed, quick):
    import test_buffer_matrix as M

    import epkern.buffer as B

    # "auto" picks the NVLink kernels wherever the GPUs can reach each other (gloo or not): on a
    # GPU machine these CPU tensors need the portable backend named
    backend = "torch" if torch.cuda.is_available() else "auto"
    buffer = B.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 24, backend=backend)
    assert buffer.backend == "torch"
    assert buffer.get_comm_stream() is None
    M.check_validation(buffer, world, "cpu")
    M.run_matrix(buffer, dist.group.WORLD, rank, world, "cpu", seed, quick=quick)
    # a fresh layout with many more tokens and top-k 1 (every token reaches one rank)
    M.run_matrix(buffer, dist.group.WORLD, rank, world, "cpu", seed + 1, num_tokens=300, num_topk=1,
                 quick=True)
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.combine(torch.zeros(1, 8, dtype=torch.bfloat16), None)


@pytest.mark.parametrize("world", [2, 4])
def test_portable_backend_option_matrix(world):
    seed = random.randrange(1 << 20)
    try:
        multiproc.run(_worker, world, "cpu", seed, world > 2)
    except multiproc.RankError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc
