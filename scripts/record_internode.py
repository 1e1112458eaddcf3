"""Record what runs of the internode paths on this machine, checked and timed:

    python3 scripts/record_internode.py [--out FILE] [--repeats N] [--quick]

Rows (default FILE benchmarks/results/internode.json):
  two-hop normal dispatch + combine (epkern.internode.HierarchicalTorchBackend) and across-node
    low-latency dispatch + combine (epkern.internode.low_latency.CollectiveLowLatency, BF16 and FP8):
    4 gloo processes as 2 nodes x 2 (EPKERN_RANKS_PER_NODE=2), CPU tensors, hidden 7168, 256
    experts, top-8; 128 and 1024 tokens per rank (normal), 128 (low latency);
  with CUDA, on one GPU: the same two paths at world size 1 over NCCL on CUDA tensors (no peers),
    and the inter-node hop's blocks (epkern.internode.low_latency_blocks: pack, unpack, partial
    sums) of 16 simulated ranks, 2 nodes x 8, on CUDA tensors against the same code on the CPU.
passed: the outputs against the brute-force references of the tests (tests/test_buffer_matrix.py
for normal mode, tests/test_internode_low_latency.py for low latency), on every rank.
timing: host clock over N round trips (each starts at a barrier; a round trip lasts until its
slowest rank is done), median / p10 / p90 in us; where processes share one machine or GPU it is
labelled correctness only. Multi-GPU figures belong to the two-GPU issue (15), not to this file.
--quick: a tiny shape and 2 round trips (tests/test_record_internode.py). Exit status 0 when
every row passed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))   # the tests' references (spawned ranks inherit sys.path)

from epkern.bench.timing import Bench, summarize  # noqa: E402
from epkern.testing import multiproc  # noqa: E402

SHARED = "correctness only: processes share one machine/GPU"
NOTE = ("multi-GPU figures (ranks on GPUs of their own, NCCL across them) belong to the two-GPU issue (15); "
        "this file holds what one machine runs")
TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 7168
    num_experts: int = 256
    num_topk: int = 8
    normal_tokens: tuple = (128, 1024)
    ll_tokens: int = 128
    sim_ranks: int = 16     # simulated ranks of the CUDA block check
    sim_per_node: int = 8


QUICK = Shape(hidden=256, num_experts=16, num_topk=4, normal_tokens=(8, 24), ll_tokens=8, sim_ranks=4, sim_per_node=2)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _sync():
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time(step, repeats: int, warmup: int) -> list[float]:
    """Host-clock us of each timed call of step(), every call starting at a barrier."""
    samples = []
    for i in range(warmup + repeats):
        dist.barrier()
        _sync()
        start = time.perf_counter()
        step()
        _sync()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


def _case(name: str, config: dict, run, kind: str = "paths") -> dict:
    """run() -> timing samples (its checks raise); a failure is recorded and the ranks carry on.
    kind: "paths" (a round trip over the group) or "blocks" (one process's tensor math, no collective)."""
    case = dict(name=name, config=config, kind=kind)
    try:
        return dict(case, passed=True, samples=run())
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        error = f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"
        return dict(case, passed=False, error=error, samples=[])


# -- two-hop normal mode -------------------------------------------------------------------------------
def _normal(rank, world, shape: Shape, tokens: int, repeats: int, warmup: int) -> list[float]:
    import test_buffer_matrix as ref

    from epkern.internode import HierarchicalTorchBackend, NodeTopology, detect_topology
    from epkern.layout import get_dispatch_layout
    from epkern.testing.multiproc import all_gather

    group, device, E = dist.group.WORLD, _device(), shape.num_experts
    topo = detect_topology(group) if world > 1 else NodeTopology(1, 1)
    backend = HierarchicalTorchBackend(group, rank, world, topo, timeout_s=TIMEOUT_S)
    gen = torch.Generator().manual_seed(7 * tokens + rank)
    x, topk_idx, weights = ref.make_inputs(rank, tokens, shape.hidden, E, shape.num_topk, gen, device)
    bf16 = x.to(torch.bfloat16)
    per_rank, per_expert, in_rank = get_dispatch_layout(topk_idx, E, world)
    args = dict(x=bf16, x_scales=None, topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, expert_alignment=1, num_worst_tokens=0,
                handle=None)

    def round_trip():
        out = backend.dispatch(**args)
        return out, backend.combine(x=out[0], handle=out[5], topk_weights=out[3], bias=())

    # the checks of test_buffer_matrix.run_matrix: rows by source rank then token, local ids, weights,
    # source index, counts; combine of the received rows: each token times the ranks it reached
    (recv_x, _, recv_idx, recv_w, counts, handle), (combined, combined_w) = round_trip()
    rows, idx, w, src, _, per_expert_ref = ref.reference(all_gather(x, group), all_gather(topk_idx, group),
                                                        all_gather(weights, group), rank, world, E)
    checks = {"rows": torch.equal(recv_x.float(), rows.float()), "topk_idx": torch.equal(recv_idx, idx),
              "topk_weights": torch.equal(recv_w, w), "src_idx": torch.equal(handle.recv_src_idx, src),
              "per_expert": counts == per_expert_ref,
              "combine": torch.equal(combined.float(), bf16.float() * in_rank.sum(1, keepdim=True)),
              "combine weights": torch.equal(combined_w, torch.where(topk_idx >= 0, weights, 0.0))}
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        raise AssertionError(f"rank {rank}: {', '.join(failed)} differ from the reference")
    return _time(round_trip, repeats, warmup)


# -- low latency on the collective engine -------------------------------------------------------------
def _expert_out(recv, fmt, rank: int, L: int) -> torch.Tensor:
    """The tests' expert stand-in (expert e scales its rows by 1 + e / 8, bf16 out) on one local expert
    at a time: no full-size fp32 copy of recv_x."""
    import test_internode_low_latency as ref

    rows = recv[0] if isinstance(recv, tuple) else recv
    y = torch.empty(rows.shape, dtype=torch.bfloat16, device=rows.device)
    for l in range(L):
        received = ref._dequant(ref._expert_slice(recv, l), fmt).to(torch.bfloat16).unsqueeze(0)
        y[l] = ref._expert(received, rank * L + l, 1)[0]
    return y


def _low_latency(rank, world, shape: Shape, kind: str, repeats: int, warmup: int) -> list[float]:
    import test_internode_low_latency as ref

    from epkern import get_low_latency_rdma_size_hint
    from epkern.internode.low_latency import CollectiveLowLatency

    E, M, H, K = shape.num_experts, shape.ll_tokens, shape.hidden, shape.num_topk
    fmt = ref.FORMATS[kind]
    ll = CollectiveLowLatency(dist.group.WORLD, get_low_latency_rdma_size_hint(M, H, world, E), timeout_s=TIMEOUT_S)
    sources = [ref._inputs(r, world, E, 11, "cpu", num_tokens=M, hidden=H, num_topk=K) for r in range(world)]
    x, topk_idx, weights = (t.to(ll.device) for t in sources[rank])
    options = dict(use_fp8=fmt[0], round_scale=fmt[1], use_ue8m0=fmt[2])

    recv, count, handle, _, _ = ll.low_latency_dispatch(x, topk_idx, M, E, **options)
    ref._check_dispatch(rank, world, E, None, recv, count, handle, fmt, [True] * world, ll.device.type, sources)
    y = _expert_out(recv, fmt, rank, E // world)
    del recv
    combined = ll.low_latency_combine(y, topk_idx, weights, handle)[0]
    ref._check_combine(combined, x, topk_idx, weights, world, E, fmt, [True] * world)

    def round_trip():
        _, _, h, _, _ = ll.low_latency_dispatch(x, topk_idx, M, E, **options)
        ll.low_latency_combine(y, topk_idx, weights, h)

    return _time(round_trip, repeats, warmup)


# -- the inter-node hop's blocks on CUDA against the CPU --------------------------------------------------
def _blocks(shape: Shape, kind: str, repeats: int, warmup: int) -> list[float]:
    """R simulated ranks in one process: every source packs its blocks, destination d receives block d
    of each. At one destination per node edge the CUDA unpack must pass the brute-force dispatch check
    and equal the CPU's bit for bit, as must each source's packed blocks and the combine's partial sums
    (the expert stand-in's rows, weighted); the source's sum of the partials over ranks (rank 0's tokens
    from the checked destinations) within one bf16 rounding of the sum of magnitudes."""
    import test_internode_low_latency as ref

    from epkern.internode import low_latency_blocks as blocks

    R, E, M, H, K = shape.sim_ranks, shape.num_experts, shape.ll_tokens, shape.hidden, shape.num_topk
    L, cuda = E // R, torch.device("cuda", torch.cuda.current_device())
    fmt = blocks.DispatchRows(kind, H, K)
    as_tuple = (fmt.use_fp8, False, fmt.use_ue8m0)   # the tests' format: fp8 = (use_fp8, round_scale, ue8m0)
    sources = [ref._inputs(r, R, E, 5, "cpu", num_tokens=M - r % 3, hidden=H, num_topk=K) for r in range(R)]
    weights = torch.stack([torch.nn.functional.pad(w, (0, 0, 0, M - w.shape[0])) for _, _, w in sources])
    mask = {d: torch.zeros(R, dtype=torch.int32, device=d) for d in ("cpu", cuda)}

    def pack(device):
        return [blocks.pack_dispatch(fmt, x.to(device), idx.to(device), None, M, R, mask[device])
                for x, idx, _ in sources]

    def outputs(device):
        fp8 = fmt.use_fp8
        return blocks.DispatchOutputs(
            recv_x=torch.zeros(L, R * M, H, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=device),
            recv_scales=torch.zeros(L, fmt.scale_cols, R * M, dtype=fmt.scale_dtype, device=device).transpose(1, 2)
            if fp8 else None,
            recv_count=torch.zeros(L, dtype=torch.int32, device=device),
            src_info=torch.zeros(L, R * M, dtype=torch.int32, device=device),
            layout_range=torch.zeros(L, R, dtype=torch.int64, device=device),
            token_rows=torch.zeros(R, M, K, dtype=torch.int32, device=device),
            recv_tokens=torch.zeros(R, dtype=torch.int32, device=device), token_weights=None)

    def receive(device, sends, d):
        """Destination d: its R blocks unpacked, then the partial sums it sends back."""
        recv = torch.stack([s[d] for s in sends])
        for block, (x, _, _) in zip(recv, sources):   # rows past a source's count are never written
            block[x.shape[0]:M].zero_()
        out = outputs(device)
        blocks.unpack_dispatch(fmt, recv, d, L, mask[device], out)
        received = (out.recv_x, out.recv_scales) if fmt.use_fp8 else out.recv_x
        y = _expert_out(received, as_tuple, d, L)
        return out, received, blocks.reduce_partials(y, out.token_rows, weights.to(device), mask[device])

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        as_bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
        return torch.equal(as_bits(a), as_bits(b.cpu()))

    cpu_sends, gpu_sends = pack("cpu"), pack(cuda)
    for r, (x, _, _) in enumerate(sources):
        T = x.shape[0]
        if not (same(cpu_sends[r][:, :T], gpu_sends[r][:, :T]) and same(cpu_sends[r][:, M], gpu_sends[r][:, M])):
            raise AssertionError(f"{kind}: source {r}'s packed blocks differ between CUDA and CPU")
    checked = sorted({0, shape.sim_per_node - 1, shape.sim_per_node, R - 1})
    back = {dev: torch.zeros(R, M, H, dtype=torch.bfloat16, device=dev) for dev in ("cpu", cuda)}
    for d in checked:
        want, _, want_partial = receive("cpu", cpu_sends, d)
        got, received, got_partial = receive(cuda, gpu_sends, d)
        handle = (got.src_info, got.layout_range, M, H)
        ref._check_dispatch(d, R, E, None, received, got.recv_count, handle, as_tuple, [True] * R, "cuda", sources)
        for field in ("recv_x", "recv_scales", "recv_count", "src_info", "layout_range", "token_rows", "recv_tokens"):
            if getattr(want, field) is not None and not same(getattr(want, field), getattr(got, field)):
                raise AssertionError(f"{kind}: destination {d}: unpacked {field} differs between CUDA and CPU")
        if not same(want_partial, got_partial):
            raise AssertionError(f"{kind}: destination {d}: partial sums differ between CUDA and CPU")
        back["cpu"][d], back[cuda][d] = want_partial[0], got_partial[0]
    T0 = sources[0][0].shape[0]
    sums = {dev: torch.empty(T0, H, dtype=torch.bfloat16, device=dev) for dev in ("cpu", cuda)}
    for dev in sums:
        blocks.sum_partials(back[dev], mask[dev], sums[dev])
    bound = back["cpu"][:, :T0].float().abs().sum(0) * 2 ** -7 + 1e-6
    if not ((sums[cuda].cpu().float() - sums["cpu"].float()).abs() <= bound).all():
        raise AssertionError(f"{kind}: the source's sums of the partials differ between CUDA and CPU")

    xs = [(x.to(cuda), idx.to(cuda)) for x, idx, _ in sources]
    out = outputs(cuda)
    others = [s[0] for s in gpu_sends[1:]]

    def pack_unpack():   # one rank's share of a dispatch: pack its R blocks, unpack the R it receives
        send = blocks.pack_dispatch(fmt, *xs[0], None, M, R, mask[cuda])
        blocks.unpack_dispatch(fmt, torch.stack([send[0]] + others), 0, L, mask[cuda], out)

    samples = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        pack_unpack()
        torch.cuda.synchronize()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


# -- the runs ---------------------------------------------------------------------------------------------
def _config(shape: Shape, tokens: int, **extra) -> dict:
    return dict(hidden=shape.hidden, num_experts=shape.num_experts, num_topk=shape.num_topk, tokens_per_rank=tokens,
                **extra)


def _group_worker(rank, world, shape: Shape, repeats: int, warmup: int, nodes: int) -> list[dict]:
    """Every case of one process group, in one order on every rank."""
    where = dict(nodes=nodes, ranks_per_node=world // nodes)
    cases = [_case(f"two-hop normal dispatch+combine, {t} tokens/rank", _config(shape, t, dtype="bf16", **where),
                   lambda t=t: _normal(rank, world, shape, t, repeats, warmup)) for t in shape.normal_tokens]
    cases += [_case(f"across-node low-latency dispatch+combine, {kind}",
                    _config(shape, shape.ll_tokens, format=kind, **where),
                    lambda kind=kind: _low_latency(rank, world, shape, kind, repeats, warmup))
              for kind in ("bf16", "fp8")]
    if _device().type == "cuda":
        sim = dict(simulated_ranks=shape.sim_ranks, ranks_per_node=shape.sim_per_node)
        cases += [_case(f"low-latency blocks (the inter-node hop) pack+unpack, cuda vs cpu, {kind}",
                        _config(shape, shape.ll_tokens, format=kind, **sim),
                        lambda kind=kind: _blocks(shape, kind, repeats, warmup), "blocks") for kind in ("bf16", "fp8")]
    return cases


def _rows(per_rank: list[list[dict]], backend: str, device: str, timing_note: dict) -> list[dict]:
    """One row per case: passed on every rank; each round trip the slowest rank's."""
    rows = []
    for cases in zip(*per_rank):
        first = cases[0]
        paths = first["kind"] == "paths"
        row = dict(name=first["name"], config=first["config"], ranks=len(cases), backend=backend if paths else "none",
                   device=device if paths else f"{device} vs cpu", passed=all(c["passed"] for c in cases))
        if row["passed"]:
            row["timing"] = dict(summarize([max(s) for s in zip(*(c["samples"] for c in cases))]), clock="host",
                                 note=timing_note[first["kind"]])
        else:
            row["errors"] = {r: c["error"] for r, c in enumerate(cases) if not c["passed"]}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "internode.json")
    parser.add_argument("--repeats", type=int, default=10, help="timed round trips per row (default 10)")
    parser.add_argument("--quick", action="store_true", help="a tiny shape and 2 round trips (for the CPU test)")
    args = parser.parse_args(argv)
    shape, repeats, warmup = (QUICK, 2, 1) if args.quick else (Shape(), args.repeats, 2)

    rows = []
    started = time.monotonic()
    cpu_ranks = multiproc.run(_group_worker, 4, "cpu", shape, repeats, warmup, 2,
                              env={"EPKERN_RANKS_PER_NODE": "2"}, timeout_s=600)
    rows += _rows(cpu_ranks, "gloo", "cpu", {"paths": SHARED})
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        one = multiproc.run(_group_worker, 1, "nccl", shape, repeats, warmup, 1, timeout_s=600)
        rows += _rows(one, "nccl", f"cuda ({gpu})",
                      {"paths": "one process on one GPU, world size 1: no peers (the two-hop backend's hops are local "
                                "copies; low latency runs NCCL's all_to_all on one rank)",
                       "blocks": "one process on one GPU: one rank's pack of its R blocks and unpack of the R it "
                                 "receives"})
    bench = Bench("internode")
    bench.rows = rows
    path = bench.save(args.out, meta=dict(note=NOTE, runtime_s=round(time.monotonic() - started, 1)))
    for row in rows:
        t = row.get("timing")
        figure = f"median {t['median_us']:12.1f} us [p10 {t['p10_us']:.1f}, p90 {t['p90_us']:.1f}]" if t else "FAILED"
        print(f"{row['name']:<72} {row['backend']:<5} x{row['ranks']}  {figure}")
    print(f"wrote {path}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
