"""Dispatch layout benchmark: `python3 -m benchmarks.layout` (from the repository root, on a GPU).

DeepSeek-V3 routing (top-8 of 256 experts) for 4096 and 16384 tokens at EP 2 and 8:
  - the kernel as a CUDA-graph replay (launch overhead excluded), the figure to compare; once more
    with the extra memset node that graphs carry when the workspace was first made inside a capture;
  - the plain API call with value checks off, and with them on (one host sync for the id range);
  - the torch reference on the GPU (what a user would write; it syncs on the boolean index).
Beside: the byte floor (topk_idx read, is_token_in_rank and the counts written) at the measured
device copy bandwidth, an empty launch, and DeepEP's 33 us (4096 x top-8 of 256, EP 2, H200).
Results -> benchmarks/results/layout.json.
"""
from __future__ import annotations

import os

import torch

from benchmarks.harness import Bench
from epkern import get_dispatch_layout
from epkern.layout import LayoutSpec, _Workspace, layout_reference

NUM_EXPERTS = 256
NUM_TOPK = 8
CONFIGS = [(4096, 2), (4096, 8), (16384, 2), (16384, 8)]  # (tokens, EP ranks)
CALLS = 10  # calls per captured graph: the time per call is device time, free of host launch cost
DEEPEP_H200_US = {(4096, 2): 33.0}  # /work/shared/REFERENCE.md, DeepEP v1.2.1 on 2 x H200


def layout_bytes(num_tokens: int, num_ranks: int) -> int:
    """Bytes the kernel must move at least: read topk_idx, write the mask and both count vectors."""
    return num_tokens * NUM_TOPK * 8 + num_tokens * num_ranks + (NUM_EXPERTS + num_ranks) * 4


def random_routing(num_tokens: int) -> torch.Tensor:
    """Distinct top-8 experts per token from random scores, as DeepEP's test draws them."""
    scores = torch.rand(num_tokens, NUM_EXPERTS, device="cuda")
    return scores.topk(NUM_TOPK, dim=1).indices.to(torch.int64).contiguous()


def _with_value_checks(enabled: bool):
    os.environ["EPKERN_CHECK_VALUES"] = "1" if enabled else "0"


def _capture_stream() -> torch.cuda.Stream:
    torch.cuda.graph(torch.cuda.CUDAGraph())  # creates torch's default capture stream if there is none yet
    return torch.cuda.graph.default_capture_stream


def _trusted_on_capture_stream(spec: LayoutSpec) -> bool:
    ws = _Workspace._cache.get((spec, torch.cuda.current_device(), _capture_stream().cuda_stream))
    return ws is not None and ws.trusted


def _trust_capture_stream(kernel, x) -> None:
    """One eager launch on the capture stream zeroes its workspace once; graphs captured later skip the memset."""
    stream = _capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel(x)
    stream.synchronize()


def bench_config(bench: Bench, num_tokens: int, num_ranks: int, copy_bw: float, launch_us: float) -> None:
    nbytes = layout_bytes(num_tokens, num_ranks)
    inputs = bench.rotating(lambda: random_routing(num_tokens), nbytes, max_sets=1024)
    config = {"tokens": num_tokens, "num_topk": NUM_TOPK, "num_experts": NUM_EXPERTS, "num_ranks": num_ranks,
              "input_sets": len(inputs)}
    kernel = lambda x: get_dispatch_layout(x, NUM_EXPERTS, num_ranks)
    label = f"{num_tokens} x top-{NUM_TOPK} of {NUM_EXPERTS}, EP {num_ranks}"

    # correctness first: a benchmark of wrong results is worth nothing
    got = kernel(inputs[0])
    want = layout_reference(inputs[0], NUM_EXPERTS, num_ranks)
    if not all(torch.equal(g, w) for g, w in zip(got, want)):
        raise RuntimeError(f"layout kernel disagrees with the reference for {label}")

    extra = {"launch_floor_us": launch_us}
    deepep = DEEPEP_H200_US.get((num_tokens, num_ranks))
    _with_value_checks(False)
    spec = LayoutSpec(num_experts=NUM_EXPERTS, num_ranks=num_ranks, num_topk=NUM_TOPK)
    if not _trusted_on_capture_stream(spec):  # made inside the capture: each graph also zeroes the ticket
        cold = bench.time(kernel, inputs, graph=True, calls_per_graph=CALLS)
        bench.record(f"layout graph replay, +memset  {label}", dict(config, mode="graph, workspace made in capture"),
                     cold, nbytes, copy_bw, {"launch_floor_us": launch_us})
    _trust_capture_stream(kernel, inputs[0])
    graph = bench.time(kernel, inputs, graph=True, calls_per_graph=CALLS)
    if deepep:
        extra.update(deepep_h200_us=deepep, speedup_vs_deepep=deepep / graph["median_us"])
    bench.record(f"layout graph replay  {label}", dict(config, mode="graph"), graph, nbytes, copy_bw, extra)
    plain = bench.time(kernel, inputs)
    bench.record(f"layout call, no checks  {label}", dict(config, mode="plain", value_checks=False), plain,
                 nbytes, copy_bw, {"launch_floor_us": launch_us})
    _with_value_checks(True)
    checked = bench.time(kernel, inputs)
    bench.record(f"layout call, checks  {label}", dict(config, mode="plain", value_checks=True), checked,
                 nbytes, copy_bw)
    reference = bench.time(lambda x: layout_reference(x, NUM_EXPERTS, num_ranks), inputs)
    bench.record(f"torch reference  {label}", dict(config, mode="torch reference"), reference, nbytes, copy_bw)

    line = (f"{label}: graph {graph['median_us']:.2f} us, call {plain['median_us']:.2f} us, "
            f"checked call {checked['median_us']:.2f} us, torch {reference['median_us']:.2f} us; "
            f"byte floor {nbytes / copy_bw * 1e6:.3f} us, empty launch {launch_us:.2f} us")
    if deepep:
        line += f"; DeepEP (H200) {deepep:.0f} us -> {deepep / graph['median_us']:.1f}x"
    print(line, flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.layout needs a CUDA GPU")
    saved = os.environ.get("EPKERN_CHECK_VALUES")
    bench = Bench("layout", warmup=20, repeats=200)
    copy_bw = bench.copy_bandwidth()
    launch_us = bench.empty_launch_us()
    print(f"device copy {copy_bw / 1e12:.2f} TB/s (read + write), empty launch {launch_us:.2f} us", flush=True)
    try:
        for num_tokens, num_ranks in CONFIGS:
            bench_config(bench, num_tokens, num_ranks, copy_bw, launch_us)
    finally:
        if saved is None:
            os.environ.pop("EPKERN_CHECK_VALUES", None)
        else:
            os.environ["EPKERN_CHECK_VALUES"] = saved
    bench.print_table()
    path = bench.save(meta={"reference": {"deepep_layout_h200_us": 33.0,
                                          "source": "REFERENCE.md: DeepEP v1.2.1, 4096 x top-8 of 256, EP 2"}})
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
