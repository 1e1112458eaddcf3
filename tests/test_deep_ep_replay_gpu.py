"""The framework replays (tests/deep_ep_replays.py) on the NVLink kernels: EP 2 and 4 with every rank
on the same GPU (gloo group, as vLLM builds its Buffer, and as scripts/oversubscribed_ep.py runs),
Buffer(backend="auto") as the frameworks build it: the GPUs reach each other, so the NVLink kernels
run although the group is gloo. Buffers are sized the frameworks' way (DeepEP's two-argument size
hint for SGLang and Megatron, 1 GiB for vLLM); 16,384 tokens per rank is past that hint's one-shot
capacity, so it needs the streamed normal mode. Every received row is checked against its source.

    python3 -m pytest -q tests/test_deep_ep_replay_gpu.py
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu


def _worker(rank, world, init_file, num_tokens, hidden):
    import deep_ep_replays as replays

    import epkern

    num_gpus = torch.cuda.device_count()
    torch.cuda.set_device(rank % num_gpus)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        probe = epkern.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 22)
        assert probe.backend == "nvlink", "a gloo group over peer-reachable GPUs must get the NVLink kernels"
        probe.destroy()
        rows = replays.run_all(dist.group.WORLD, rank, world, torch.device("cuda", rank % num_gpus), num_tokens,
                               hidden=hidden)
        print(f"rank {rank}/{world}: {num_tokens} tokens, hidden {hidden}: rows received {rows}", flush=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("num_tokens, hidden", [(4096, 256), (16384, 256), (2048, 7168)])
def test_framework_replays_on_nvlink(world, num_tokens, hidden):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), num_tokens, hidden), nprocs=world, join=True)
