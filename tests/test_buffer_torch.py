"""The portable backend (all_to_all_single) under gloo on CPU, with 2 and 4 processes: the full
option matrix of test_buffer_matrix.run_matrix plus input validation. Seeds differ per run."""
import os
import random
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, seed, quick):
    import test_buffer_matrix as M

    import epkern.buffer as B

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_portable_backend_option_matrix(world):
    seed = random.randrange(1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        try:
            mp.spawn(_worker, args=(world, init_file, seed, world > 2), nprocs=world, join=True)
        except Exception as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc
