"""Streamed normal-mode dispatch and combine on the NVLink kernels, ranks sharing the GPU(s) over a
gloo group (as scripts/oversubscribed_ep.py runs them): token counts well past what the peer
buffer holds at once (many rounds), different on every rank, idle ranks among them, with every
received row, top-k entry, weight and source index checked against its source, and combine
checked exactly; plus issue 18's idle rank (EP2, 64 tokens and 0, hidden 2048, 48 experts, top-4)
finishing well inside its timeout.

    python3 -m pytest -q tests/test_intranode_streaming_gpu.py
"""
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

HIDDEN, NUM_TOPK = 2048, 4


def source_rows(rank, num_tokens, hidden, device):
    """Small integers (exact in bf16 and e4m3) naming the source rank and the token (base-16 digits)."""
    t = torch.arange(num_tokens, device=device).view(-1, 1)
    x = ((rank * 3 + t * 5 + torch.arange(hidden, device=device).view(1, -1)) % 13).float()
    x[:, 0] = rank
    for i in range(5):
        x[:, 1 + i] = (t[:, 0] >> (4 * i)) % 16
    return x


def make_inputs(seed, rank, num_tokens, num_experts, device):
    gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    topk_idx = torch.topk(scores, NUM_TOPK, dim=-1).indices.to(torch.int64)
    topk_idx = topk_idx.masked_fill(torch.rand(num_tokens, NUM_TOPK, generator=gen) < 0.1, -1)
    if num_tokens > 3:
        topk_idx[3] = -1   # a token that goes nowhere
    weights = torch.randint(1, 9, (num_tokens, NUM_TOPK), generator=gen).float() / 8
    return source_rows(rank, num_tokens, HIDDEN, device), topk_idx.to(device), weights.to(device)


def cast_fp8(x):
    """The rows as e4m3 (exact: small integers) with scales that name the source rank."""
    return x.to(torch.float8_e4m3fn), (x[:, :1] + 1).expand(-1, x.shape[1] // 128).contiguous()


def expected(inputs, rank, num_ranks, num_experts):
    """Rows `rank` receives (source rank, then token): x, local top-k ids, weights, source index."""
    epr = num_experts // num_ranks
    lo, hi = rank * epr, (rank + 1) * epr
    xs, idx, ws, src = [], [], [], []
    for x, topk, w in inputs:
        mine = (topk >= lo) & (topk < hi)
        tokens = mine.any(dim=1).nonzero().view(-1)
        xs.append(x[tokens])
        idx.append(torch.where(mine[tokens], topk[tokens] - lo, torch.full_like(topk[tokens], -1)))
        ws.append(torch.where(mine[tokens], w[tokens], torch.zeros_like(w[tokens])))
        src.append(tokens.to(torch.int32))
    per_expert = torch.bincount(torch.cat([t.view(-1) for _, t, _ in inputs]).clamp(min=-1) + 1,
                                minlength=num_experts + 1)[1:][lo:hi].tolist()
    return torch.cat(xs), torch.cat(idx), torch.cat(ws), torch.cat(src), per_expert


def check_case(buffer, rank, num_ranks, tokens, num_experts, seed, expect_rounds):
    """Dispatch (bf16, top-k), combine, cached FP8 dispatch and padded (num_worst_tokens) dispatch."""
    import epkern.buffer as B
    from epkern.normal import kernels as ik
    from epkern.normal import rounds as rd

    device = torch.device("cuda", torch.cuda.current_device())
    inputs = [make_inputs(seed, r, tokens[r], num_experts, device) for r in range(num_ranks)]
    x, topk_idx, topk_weights = inputs[rank]
    ref_x, ref_idx, ref_w, ref_src, ref_per_expert = expected(inputs, rank, num_ranks, num_experts)
    label = f"EP{num_ranks} tokens={tokens} rank {rank}"

    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    backend = buffer._backend
    launches0 = backend.launches
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x.to(torch.bfloat16), topk_idx=topk_idx, topk_weights=topk_weights, config=B.Config(24), **layout)
    rounds = backend.launches - launches0 - 1   # less the notify launch
    if expect_rounds == "many":
        assert rounds > 1, f"{label}: expected a streamed dispatch, ran {rounds} round(s)"
    else:
        assert rounds == expect_rounds, f"{label}: {rounds} dispatch rounds, expected {expect_rounds}"
    assert recv_x.shape == ref_x.shape, f"{label}: {recv_x.shape[0]} rows, expected {ref_x.shape[0]}"
    assert torch.equal(recv_x.float(), ref_x), f"{label}: dispatched rows differ from their sources"
    assert torch.equal(recv_idx, ref_idx), f"{label}: top-k ids"
    assert torch.equal(recv_w, ref_w), f"{label}: top-k weights"
    assert torch.equal(handle.recv_src_idx, ref_src), f"{label}: source indices"
    assert counts == ref_per_expert, f"{label}: per-expert counts"

    # combine: every rank returns the rows it received; each token sums one copy per rank it reached
    launches0 = backend.launches
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, config=B.Config(24))
    combine_rounds = backend.launches - launches0
    want_rounds = rd.combine_plan(max(tokens), backend.layout.slot_capacity(ik.combine_slot_bytes(HIDDEN, NUM_TOPK)),
                                  num_ranks).num_rounds
    assert combine_rounds == want_rounds, f"{label}: {combine_rounds} combine rounds, planned {want_rounds}"
    reached = in_rank.sum(1, keepdim=True).float()
    assert torch.equal(combined.float(), (x * reached).to(torch.bfloat16).float()), f"{label}: combined rows"
    assert torch.equal(combined_w, torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))), \
        f"{label}: combined weights"

    # cached dispatch of FP8 rows with the same handle (streams the same way, no notify)
    (recv_fp8, recv_scales), *_ = buffer.dispatch(cast_fp8(x), handle=handle, config=B.Config(24))
    ref_fp8, ref_scales = cast_fp8(ref_x)
    assert torch.equal(recv_fp8.view(torch.uint8), ref_fp8.view(torch.uint8)), f"{label}: cached FP8 rows"
    assert torch.equal(recv_scales, ref_scales), f"{label}: cached FP8 scales"

    # the same cached calls from a side stream, asynchronously, and back on the current stream, where
    # repeated synchronous calls launch directly (Buffer._launch's stream tail): each sees its rows
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    for step in ("side", "async", "main", "main again", "side again", "main"):
        if step.startswith("side"):
            side.wait_stream(main)
            with torch.cuda.stream(side):
                (got, got_scales), *_ = buffer.dispatch(cast_fp8(x), handle=handle, config=B.Config(24))
                got_combined, _, _ = buffer.combine(recv_x, handle, config=B.Config(24))
            main.wait_stream(side)
        elif step == "async":
            (got, got_scales), *_, event = buffer.dispatch(cast_fp8(x), handle=handle, config=B.Config(24),
                                                           async_finish=True)
            event.current_stream_wait()
            got_combined, _, _ = buffer.combine(recv_x, handle, config=B.Config(24))
        else:
            (got, got_scales), *_ = buffer.dispatch(cast_fp8(x), handle=handle, config=B.Config(24))
            got_combined, _, _ = buffer.combine(recv_x, handle, config=B.Config(24))
        assert torch.equal(got.view(torch.uint8), ref_fp8.view(torch.uint8)), f"{label}: {step}: cached FP8 rows"
        assert torch.equal(got_scales, ref_scales), f"{label}: {step}: cached FP8 scales"
        assert torch.equal(got_combined.float(), (x * reached).to(torch.bfloat16).float()), f"{label}: {step}: combine"

    # padded dispatch: no host sync, rounds planned from num_worst_tokens
    worst = max(1, sum(tokens))   # (0 would mean no padding)
    recv_x, recv_idx, _, counts, worst_handle, _ = buffer.dispatch(
        x.to(torch.bfloat16), topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=worst,
        config=B.Config(24), **layout)
    n = ref_x.shape[0]
    assert recv_x.shape[0] == worst and counts == []
    assert torch.equal(recv_x[:n].float(), ref_x), f"{label}: padded dispatch rows"
    assert torch.equal(recv_idx[:n], ref_idx) and bool((recv_idx[n:] == -1).all()), f"{label}: padded top-k ids"
    assert bool((worst_handle.recv_src_idx[n:] == -1).all()), f"{label}: padding rows name no source"
    per_round = rd.combine_token_capacity(backend.layout.slot_capacity(ik.combine_slot_bytes(HIDDEN, 0)), num_ranks)
    if max(tokens) <= per_round:   # combine after num_worst_tokens is one round
        combined, _, _ = buffer.combine(recv_x, worst_handle, config=B.Config(24))
        assert torch.equal(combined.float(), (x * reached).to(torch.bfloat16).float()), f"{label}: padded combine"
    torch.cuda.synchronize()


def _worker(rank, num_ranks, init_file, cases):
    import epkern.buffer as B

    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    group = dist.group.WORLD
    try:
        for name, tokens, num_experts, max_tokens_hint, expect_rounds, timeout_s in cases:
            hint = (B.Config().get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks) if max_tokens_hint is None else
                    B.Config().get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks, max_tokens_hint))
            buffer = B.Buffer(group, num_nvl_bytes=hint, backend="nvlink", timeout_s=timeout_s)
            start = time.monotonic()
            check_case(buffer, rank, num_ranks, tokens, num_experts, seed=len(name), expect_rounds=expect_rounds)
            elapsed = time.monotonic() - start   # a peer past the timeout raises PeerTimeoutError instead
            buffer.destroy()
            dist.barrier()
            if rank == 0:
                print(f"{name}: passed in {elapsed:.1f} s", flush=True)
    finally:
        dist.destroy_process_group()


def _spawn(num_ranks, cases):
    """Run the cases on num_ranks processes; a hang (a wait that outlives every timeout) fails the
    test after the cases' timeouts plus a compile allowance, and its processes are killed."""
    os.environ.setdefault("EPKERN_CHECK_VALUES", "1")
    limit = 300 + sum(case[-1] for case in cases)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_worker, args=(num_ranks, os.path.join(tmp, "init"), cases), nprocs=num_ranks, join=False)
        deadline = time.monotonic() + limit
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                pytest.fail(f"EP{num_ranks} {[c[0] for c in cases]}: still running after {limit} s (a hang)")


def test_idle_rank_ep2():
    """Issue 18 item 6a: one rank with 64 tokens, the other with none (both must finish, one round)."""
    _spawn(2, [("idle rank EP2", [64, 0], 48, None, 1, 10.0),
               ("idle rank EP2, the other way", [0, 64], 48, None, 1, 10.0),
               ("both idle EP2", [0, 0], 48, None, 1, 10.0)])


def test_streamed_ep2():
    # a buffer sized for 256 tokens per rank, 20 to 40 times that per rank; then DeepEP's two-argument
    # hint (4,096 tokens per rank) with 4x past it and an idle rank
    _spawn(2, [("streamed EP2", [9000, 5123], 32, 256, "many", 120.0),
               ("streamed EP2, one idle", [0, 7001], 32, 256, "many", 120.0),
               ("two-argument hint EP2, 16384 + idle", [16384, 0], 32, None, "many", 120.0)])


def test_streamed_ep4():
    _spawn(4, [("streamed EP4", [3000, 0, 1777, 4100], 64, 128, "many", 180.0),
               ("idle ranks EP4", [0, 50, 0, 0], 64, None, 1, 30.0)])


def test_65536_tokens_per_rank_ep2():
    """The issue's upper end: 65,536 tokens per rank through the two-argument hint's buffer."""
    _spawn(2, [("65536 tokens per rank EP2", [65536, 65536], 32, None, "many", 300.0)])


# -- issue 18 item 6b: dispatch with num_worst_tokens and combine in one CUDA graph -------------------
GRAPH_TOKENS, GRAPH_REPLAYS = 96, 6


def _graph_worker(rank, num_ranks, init_file):
    import epkern.buffer as B

    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks)
    try:
        buffer = B.Buffer(dist.group.WORLD, num_nvl_bytes=B.Config().get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks),
                          backend="nvlink", timeout_s=60)
        num_experts, worst = 8 * num_ranks, GRAPH_TOKENS * num_ranks
        x = torch.zeros(GRAPH_TOKENS, HIDDEN, dtype=torch.bfloat16, device=device)
        topk_idx = torch.zeros(GRAPH_TOKENS, NUM_TOPK, dtype=torch.int64, device=device)
        topk_weights = torch.zeros(GRAPH_TOKENS, NUM_TOPK, dtype=torch.float32, device=device)

        def load(replay):   # new inputs, written in place (every rank can rebuild every rank's)
            inputs = [make_inputs(100 + replay, r, GRAPH_TOKENS, num_experts, device) for r in range(num_ranks)]
            src_x, src_idx, src_w = inputs[rank]
            src_x = src_x.clone()
            src_x[:, 6] = replay   # rows of different replays differ
            x.copy_(src_x.to(torch.bfloat16))
            topk_idx.copy_(src_idx)
            topk_weights.copy_(src_w)
            for r, inp in enumerate(inputs):
                inp[0][:, 6] = replay
            return inputs

        def step():
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
                x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, num_worst_tokens=worst)
            combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
            return recv_x, recv_idx, recv_w, handle.recv_src_idx, in_rank, combined, combined_w

        load(0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm up (compiles, allocates) outside the capture
            step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for replay in range(1, GRAPH_REPLAYS + 1):
            inputs = load(replay)
            # skew the ranks: a replay that reused its capture's sequence numbers would pass the
            # barriers on the previous replay's flags and read stale rows
            torch.cuda._sleep(((rank + replay) % num_ranks) * 20_000_000)
            graph.replay()
            torch.cuda.synchronize()
            recv_x, recv_idx, recv_w, recv_src, in_rank, combined, combined_w = out
            ref_x, ref_idx, ref_w, ref_src, _ = expected(inputs, rank, num_ranks, num_experts)
            n, label = ref_x.shape[0], f"EP{num_ranks} rank {rank} replay {replay}"
            assert torch.equal(recv_x[:n].float(), ref_x), f"{label}: rows"
            assert torch.equal(recv_idx[:n], ref_idx) and torch.equal(recv_w[:n], ref_w), f"{label}: top-k"
            assert torch.equal(recv_src[:n], ref_src) and bool((recv_src[n:] == -1).all()), f"{label}: sources"
            reached = in_rank.sum(1, keepdim=True).float()
            assert torch.equal(combined.float(), (x.float() * reached).to(torch.bfloat16).float()), f"{label}: combine"
            assert torch.equal(combined_w, torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))), \
                f"{label}: combined weights"
        buffer.destroy()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_dispatch_combine_graph_replays_with_new_inputs(num_ranks):
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_graph_worker, args=(num_ranks, os.path.join(tmp, "init")), nprocs=num_ranks, join=False)
        deadline = time.monotonic() + 600
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                pytest.fail(f"EP{num_ranks} graph replays: still running after 600 s (a hang)")
