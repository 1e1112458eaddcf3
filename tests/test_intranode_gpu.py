"""Normal-mode dispatch/combine on 2 GPUs (NCCL group, spawned processes): the option matrix of
test_buffer_matrix.run_matrix for the NVLink and the portable backend, DeepEP's shape (hidden
7168, top-8 of 256), no recompiles across token counts, validation before launch, and a peer that
never arrives raising a timeout that names the rank and the kernel."""
import os
import random

import pytest
import torch
import torch.distributed as dist

from epkern.testing import multiproc

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def _worker(rank, world, seed):
    import test_buffer_matrix as M

    import epkern.buffer as B
    from epkern.normal.nvlink import PeerTimeoutError
    from epkern.codegen import runtime

    group = dist.group.WORLD
    for backend in ("nvlink", "torch"):
        buffer = B.Buffer(group, num_nvl_bytes=int(1e9), backend=backend)
        assert buffer.backend == backend
        M.check_validation(buffer, world, "cuda")
        M.run_matrix(buffer, group, rank, world, "cuda", seed, num_tokens=300, hidden=2048, num_experts=16,
                     num_topk=4)
        M.run_matrix(buffer, group, rank, world, "cuda", seed + 1, num_tokens=1024, hidden=7168,
                     num_experts=256, num_topk=8, quick=True)
        if backend == "nvlink":
            # other token counts reuse the compiled kernels
            loaded = len(runtime._modules)
            for tokens in (1, 77, 513):
                M.run_matrix(buffer, group, rank, world, "cuda", seed + tokens, num_tokens=tokens, hidden=7168,
                             num_experts=256, num_topk=8, quick=True)
            assert len(runtime._modules) == loaded
        buffer.destroy()

    # rank 1 never dispatches: rank 0 must time out naming rank 1 and the notify kernel
    buffer = B.Buffer(group, num_nvl_bytes=1 << 28, backend="nvlink", timeout_s=2)
    x = torch.ones(16, 256, dtype=torch.bfloat16, device="cuda")
    topk = torch.arange(16, device="cuda").view(-1, 1).remainder(8).to(torch.int64)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 8)
    if rank == 0:
        with pytest.raises(PeerTimeoutError, match="notify on rank 0: rank 1 did not arrive"):
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert)
        with pytest.raises(PeerTimeoutError):   # the buffer stays failed
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert)
    buffer.destroy()


def test_intranode_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    seed = random.randrange(1 << 20)
    os.environ.setdefault("EPKERN_TIMEOUT_S", "30")
    try:
        multiproc.run(_worker, 2, "nccl", seed)
    except multiproc.RankError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc
