"""epkern.moe on the NVLink kernels, 2 ranks sharing the GPUs there are (rank r on GPU r % count,
a gloo group, as scripts/oversubscribed_ep.py runs them): prefill (normal mode) and decode
(low-latency) against the single-process layer, overlapped against serial bit for bit, decode
replayed from one CUDA graph against eager, and the LPLB planner. Times mean nothing here."""
import os
import tempfile

import pytest
import torch

from test_moe_cpu import _close

H, I, E, K, SHARED, T, M = 1024, 256, 16, 4, 256, 96, 64

pytestmark = pytest.mark.gpu


def _x(rank: int, seed: int, tokens: int = T) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(1000 * seed + rank)
    return torch.randn(tokens, H, generator=g, device="cuda").to(torch.bfloat16)


def _worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    from epkern import Buffer, Config, get_low_latency_rdma_size_hint
    from epkern.moe import MoE, fast_grouped_mm
    from epkern.solver import Planner, ring

    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        nvl = Config().get_nvl_buffer_size_hint(2 * H, world, T)
        ll = max(get_low_latency_rdma_size_hint(M, H, world, E), get_low_latency_rdma_size_hint(M, H, world, 20))
        buffer = Buffer(group, num_nvl_bytes=max(nvl, 1 << 26), num_rdma_bytes=ll, low_latency_mode=True,
                        backend="nvlink", timeout_s=60.0)
        assert buffer.backend == "nvlink"
        opts = dict(shared_intermediate=SHARED, seed=7, score_func="sigmoid", n_group=4, topk_group=2,
                    correction_bias=True, routed_scaling_factor=2.5, num_max_dispatch_tokens_per_rank=M,
                    device="cuda")
        reference = MoE(H, I, E, K, **opts)
        layers = {mode: MoE(H, I, E, K, buffer=buffer, mode=mode, **opts) for mode in ("prefill", "decode")}
        layers["decode, sends on a side stream"] = MoE(H, I, E, K, buffer=buffer, mode="decode",
                                                       decode_send_stream=True, **opts)
        assert layers["decode"].decode_path == "low_latency"
        print(f"rank {rank}: grouped GEMM fast path {fast_grouped_mm(torch.device('cuda'))}, "
              f"weights-carried dispatch {layers['decode']._ll_weights}", flush=True)
        for seed in (1, 2):
            x = _x(rank, seed)
            want = reference(x)
            for mode, layer in layers.items():
                layer.overlap = True
                overlapped = layer(x)
                layer.overlap = False
                serial = layer(x)
                torch.cuda.synchronize()
                assert torch.equal(overlapped, serial), f"{mode}: overlapped != serial"
                # decode: the low-latency combine rounds each rank's partial sum to bf16 before the
                # sum, and a partial sum can exceed the result in magnitude: one bf16 step more
                _close(overlapped, want, f"{mode} seed {seed} vs single process",
                       scale=2.0 if mode.startswith("decode") else 1.0)
                print(f"rank {rank}: {mode} seed {seed} passed", flush=True)

        # decode: the whole overlapped step in one CUDA graph, replayed on new inputs
        for name in ("decode", "decode, sends on a side stream"):
            layer = layers[name]
            layer.overlap = True
            static_x = _x(rank, 3).clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):   # warm-up (every kernel compiled) on a side stream, as capture wants
                    layer(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = layer(static_x)
            for seed in (4, 5):
                x = _x(rank, seed)
                static_x.copy_(x)
                graph.replay()
                eager = layer(x)
                torch.cuda.synchronize()
                assert torch.equal(static_y, eager), f"{name}: graph replay seed {seed} != eager"
                _close(eager, reference(x), f"{name}: graph replay seed {seed} vs single process", scale=2.0)
            print(f"rank {rank}: {name} graph replay passed", flush=True)

        # LPLB planner (no all-reduce: a gloo group cannot reduce CUDA tensors in order with the kernels)
        planner = Planner(ring(2), 20, E, ep_size=world, device="cuda")
        x = _x(rank, 6)
        want = reference(x)
        for mode in ("prefill", "decode"):
            layer = MoE(H, I, E, K, buffer=buffer, mode=mode, planner=planner, **opts)
            _close(layer(x), want, f"{mode} with the planner", scale=2.0 if mode == "decode" else 1.0)
        print(f"rank {rank}: planner passed", flush=True)
        dist.barrier()
        buffer.destroy()
    finally:
        dist.destroy_process_group()


def _precompile() -> None:
    """Build the kernels in parallel first (the ranks would otherwise compile them in turn)."""
    import json
    import subprocess
    import sys

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([dict(hidden=H, num_experts=e, num_topk=K, ep_sizes=[2]) for e in (E, 20)], f)
    subprocess.run([sys.executable, "-m", "epkern.cli", "precompile", "--config", f.name], check=True,
                   stdout=subprocess.DEVNULL)
    os.unlink(f.name)


def test_moe_layer_two_ranks_on_nvlink():
    import torch.multiprocessing as mp

    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    _precompile()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)
