"""SGLang's, vLLM's and Megatron-LM's DeepEP call sequences (tests/deep_ep_replays.py) on the portable
backend: two processes under gloo on CPU, 16,384 tokens per rank (SGLang's prefill chunks), FP8 with
column-major scales (fp32 and packed UE8M0), every received row checked against its source."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NUM_TOKENS = 16384


def _worker(rank, world, init_file):
    import deep_ep_replays as replays

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # a GPU machine would pick the NVLink kernels for "auto" (they need CUDA tensors): name the
        # portable backend there; without CUDA "auto" is what the frameworks' calls get
        backend = "torch" if torch.cuda.is_available() else "auto"
        rows = replays.run_all(dist.group.WORLD, rank, world, "cpu", NUM_TOKENS, backend=backend)
        assert all(n > NUM_TOKENS // 2 for n in rows.values()), rows
    finally:
        dist.destroy_process_group()


def test_framework_replays_on_the_portable_backend():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)
