"""A small workload of one kernel family, for compute-sanitizer (scripts/sanitize.sh runs it).

    python3 scripts/sanitize_workload.py --family fp8|layout|lplb
    python3 scripts/sanitize_workload.py --family intranode|low_latency --rank R --ranks N --init FILE

Every kernel of the family runs at least once on small shapes, and the results are checked
against the CPU references where one exists, so a run that "passes" the sanitizer also computed
the right thing. The multi-rank families run as N processes sharing GPU 0 over a gloo group
(file:// rendezvous), as scripts/oversubscribed_ep.py does; compute-sanitizer wraps each process.
A plain run (no sanitizer) first builds every kernel the family uses, so the sanitized runs only load.
Prints one line "<family> rank R: ok" and exits 0 when every check passed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HIDDEN, TOKENS, TOPK = 512, 48, 4


def fp8() -> None:
    from epkern import fp8

    x = (torch.randn(TOKENS, 2048, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    for round_scale, ue8m0 in ((False, False), (True, False), (True, True)):
        for layout in ("row", "col"):
            q, s = fp8.per_token_cast_to_fp8(x.cuda(), 128, round_scale, ue8m0, layout)
            q_ref, s_ref = fp8.per_token_cast_to_fp8(x, 128, round_scale, ue8m0, layout)
            assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8)), (round_scale, ue8m0, layout)
            y = fp8.per_token_cast_back(q, s)
            assert torch.equal(y.cpu(), fp8.per_token_cast_back(q_ref, s_ref))


def layout() -> None:
    from epkern.layout import get_dispatch_layout

    gen = torch.Generator().manual_seed(2)
    topk = torch.randint(-1, 64, (TOKENS * 4, TOPK), generator=gen)
    got = get_dispatch_layout(topk.cuda(), 64, 8)
    want = get_dispatch_layout(topk, 64, 8)
    for g, w in zip(got, want):
        if g is not None:
            assert torch.equal(g.cpu(), w)


def lplb() -> None:
    from epkern.solver import Planner, cube_8p2e

    gen = torch.Generator().manual_seed(3)
    planner = Planner(cube_8p2e().cuda(), 64 + 2 * 8, 64, 8)
    history = (torch.rand(64, generator=gen) * 1000).cuda()
    planner.update_redundancy_mapping(history)
    idx = torch.randint(-1, 64, (TOKENS * 8, TOPK), generator=gen).cuda()
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    counts, by_sm = planner.count_workload(idx, 8)
    probs, _ = planner.solve_probs(counts, counter)
    mapped = planner.weighted_select_target(idx, probs, by_sm, 8)
    assert mapped.shape == idx.shape and bool(((mapped >= -1) & (mapped < 80)).all())
    assert torch.equal(planner.phy2log.long()[mapped.clamp(min=0)] * (mapped >= 0) - (mapped < 0).long(),
                       idx * (idx >= 0) - (idx < 0).long())


def _group(rank: int, ranks: int, init: str):
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=ranks)
    return dist.group.WORLD


def _inputs(rank: int, experts: int):
    gen = torch.Generator().manual_seed(10 + rank)
    x = (torch.randn(TOKENS, HIDDEN, generator=gen)).to(torch.bfloat16).cuda()
    topk = torch.stack([torch.randperm(experts, generator=gen)[:TOPK] for _ in range(TOKENS)]).cuda()
    weights = torch.rand(TOKENS, TOPK, generator=gen).cuda()
    return x, topk, weights


def intranode(rank: int, ranks: int, init: str) -> None:
    import torch.distributed as dist

    from epkern import Buffer, Config, per_token_cast_to_fp8

    group = _group(rank, ranks, init)
    experts = 4 * ranks
    config = Config()
    buffer = Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(HIDDEN * 2, ranks, 256), backend="nvlink")
    x, topk, weights = _inputs(rank, experts)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, experts)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk, topk_weights=weights, **args)
    combined, _, _ = buffer.combine(recv_x, handle)
    want = (x.float() * in_rank.sum(-1, keepdim=True)).to(torch.bfloat16)
    assert torch.allclose(combined.float(), want.float(), rtol=2 ** -7, atol=1e-2), "bf16 round trip"
    fp8_x = per_token_cast_to_fp8(x)
    recv_fp8, _, _, _, handle8, _ = buffer.dispatch(fp8_x, topk_idx=topk, topk_weights=weights, **args)
    cached, _, _, _, _, _ = buffer.dispatch(x, handle=handle)        # cached layout
    assert torch.equal(cached, recv_x)
    combined_w, _, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    torch.cuda.synchronize()
    buffer.destroy()
    dist.barrier()
    dist.destroy_process_group()


def low_latency(rank: int, ranks: int, init: str) -> None:
    import torch.distributed as dist

    from epkern.low_latency import LowLatencyBuffer, get_low_latency_rdma_size_hint

    group = _group(rank, ranks, init)
    experts, max_tokens = 4 * ranks, 64
    buf = LowLatencyBuffer(group, get_low_latency_rdma_size_hint(max_tokens, HIDDEN, ranks, experts), timeout_s=60.0,
                           num_sms=8)
    x, topk, weights = _inputs(rank, experts)
    for use_fp8, round_scale, ue8m0 in ((False, False, False), (True, False, False), (True, True, False),
                                        (True, True, True)):
        recv, count, handle, _, _ = buf.low_latency_dispatch(x, topk, max_tokens, experts, use_fp8=use_fp8,
                                                             round_scale=round_scale, use_ue8m0=ue8m0)
        rows = recv if not use_fp8 else recv[0].float().to(torch.bfloat16)  # stand-in expert output
        out, _, _ = buf.low_latency_combine(rows if not use_fp8 else torch.zeros_like(rows), topk, weights, handle)
        if not use_fp8:
            want = (x.float() * weights.sum(-1, keepdim=True)).to(torch.bfloat16)
            assert torch.allclose(out.float(), want.float(), rtol=2 ** -6, atol=1e-2), "bf16 round trip"
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=["fp8", "layout", "lplb", "intranode", "low_latency"])
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--init", help="rendezvous file of the multi-rank families")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.family in ("intranode", "low_latency"):
        if not args.init:
            parser.error("--init FILE is needed for the multi-rank families")
        globals()[args.family](args.rank, args.ranks, args.init)
    else:
        torch.cuda.set_device(0)
        globals()[args.family]()
        torch.cuda.synchronize()
    print(f"{args.family} rank {args.rank}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
