"""SGLang's, vLLM's and Megatron-LM's DeepEP call sequences (tests/deep_ep_replays.py) on the portable
backend: two processes under gloo on CPU, 16,384 tokens per rank (SGLang's prefill chunks), FP8 with
column-major scales (fp32 and packed UE8M0), every received row checked against its source."""
import torch
import torch.distributed as dist

from epkern.testing import multiproc

NUM_TOKENS = 16384


def _worker(rank, world):
    import deep_ep_replays as replays

    torch.set_num_threads(1)
    # a GPU machine would pick the NVLink kernels for "auto" (they need CUDA tensors): name the
    # portable backend there; without CUDA "auto" is what the frameworks' calls get
    backend = "torch" if torch.cuda.is_available() else "auto"
    rows = replays.run_all(dist.group.WORLD, rank, world, "cpu", NUM_TOKENS, backend=backend)
    assert all(n > NUM_TOKENS // 2 for n in rows.values()), rows


def test_framework_replays_on_the_portable_backend():
    multiproc.run(_worker, 2, "cpu")
