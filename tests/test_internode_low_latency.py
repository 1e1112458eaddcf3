"""Low-latency mode on the collective engine (epkern.internode.low_latency): what epkern.Buffer runs
across nodes, without peer access, and on CPU.

Every rank rebuilds every rank's inputs from the seed (token counts differ, one rank has none, a
few top-k entries are -1), so the checks are brute force: recv_x, counts, layout ranges and
source indices against a loop over all ranks' tokens, combine against the weighted sum of each
token's expert rows (two bf16 roundings: within 2^-7 of the sum of the terms' magnitudes).
"""
import pytest
import torch

from epkern.testing import multiproc

H, K = 256, 3            # 2 scale groups: a UE8M0 word padded with two zero bytes
M = 8
FORMATS = {"bf16": (False, False, False), "fp8": (True, False, False), "fp8_round": (True, True, False),
           "fp8_ue8m0": (True, True, True)}
TOKENS = [5, 0, 8, 3]    # tokens per rank (rank 1 has none)


def _inputs(rank: int, num_ranks: int, num_experts: int, seed: int, device, num_tokens: int | None = None,
            hidden: int = H, num_topk: int = K):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    T = TOKENS[rank % len(TOKENS)] if num_tokens is None else num_tokens
    x = (torch.randn(T, hidden, generator=g) * 2).to(torch.bfloat16)
    topk_idx = torch.rand(T, num_experts, generator=g).topk(num_topk, dim=1).indices
    topk_idx[torch.rand(T, num_topk, generator=g) < 0.2] = -1
    weights = torch.rand(T, num_topk, generator=g) + 0.1
    return x.to(device), topk_idx.to(device), weights.to(device)


def _dequant(recv, fmt) -> torch.Tensor:
    """[L, R*M, H] fp32 from the received tensors."""
    use_fp8, _, use_ue8m0 = fmt
    if not use_fp8:
        return recv.float()
    q, scales = recv
    if use_ue8m0:
        words = scales.to(torch.int64)
        b = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], -1).flatten(-2)[..., :q.shape[-1] // 128]
        scales = torch.ldexp(torch.ones_like(b, dtype=torch.float32), (b - 127).to(torch.int32))
    return q.float() * scales.float().repeat_interleave(128, dim=-1)


def _expert_slice(recv, l: int):
    """Local expert l's received rows (and scales), in recv's format."""
    return tuple(t[l] for t in recv) if isinstance(recv, tuple) else recv[l]


def _expected_rows(x, fmt) -> torch.Tensor:
    """The fp32 values a source's rows arrive as (the FP8 cast is epkern.fp8's reference)."""
    from epkern.fp8 import dequantize_reference, quantize_reference

    if not fmt[0]:
        return x.float()
    q, scale = quantize_reference(x, 128, fmt[1])
    return dequantize_reference(q, scale, 128, torch.float32)


def _check_dispatch(rank, R, E, seed, recv, count, handle, fmt, talks, device, sources=None):
    """talks[r]: rank r's tokens reach us (neither side masked the other); sources: every rank's
    (x, topk_idx, weights) on the CPU (default: _inputs of the seed). M and H are the handle's."""
    L = E // R
    src_info, layout_range, M, H = handle[0], handle[1], handle[2], handle[3]
    if fmt[0]:
        q, scales = recv
        assert q.dtype == torch.float8_e4m3fn and q.shape == (L, R * M, H)
        cols = scales.shape[-1]
        assert cols == (1 if fmt[2] else H // 128)
        assert scales.stride() == (cols * R * M, 1, R * M), "scales must be column-major per expert"
    else:
        assert recv.dtype == torch.bfloat16 and recv.shape == (L, R * M, H)
    sources = sources or [_inputs(r, R, E, seed, "cpu") for r in range(R)]
    for l in range(L):
        e = rank * L + l
        data = _dequant(_expert_slice(recv, l), fmt).cpu()   # one expert at a time: no full-size fp32 copy
        begin = 0
        for r in range(R):
            x_r, idx_r, _ = sources[r]
            tokens = (idx_r == e).any(1).nonzero().flatten() if talks[r] else torch.empty(0, dtype=torch.long)
            n = len(tokens)
            lr = int(layout_range[l, r])
            assert (lr >> 32, lr & 0xFFFFFFFF) == (begin, n), f"rank {rank} expert {e} source {r}: layout_range"
            assert torch.equal(src_info[l, begin:begin + n].cpu().long(), tokens), f"expert {e} source {r}: src_info"
            want = _expected_rows(x_r[tokens], fmt)
            assert torch.equal(data[begin:begin + n], want), f"expert {e} source {r}: rows"
            begin += n
        assert int(count[l]) == begin, f"rank {rank} expert {e}: {int(count[l])} rows, expected {begin}"
        assert (src_info[l, begin:] == -1).all()


def _expert(recv_bf16: torch.Tensor, rank: int, L: int) -> torch.Tensor:
    """The expert stand-in: expert e scales its rows by 1 + e / 8 (bf16 out)."""
    f = 1 + (rank * L + torch.arange(L, device=recv_bf16.device)) / 8
    return (recv_bf16.float() * f.view(-1, 1, 1)).to(torch.bfloat16)


def _check_combine(combined, x, topk_idx, weights, R, E, fmt, answers):
    """answers[d]: rank d's experts answer us."""
    L = E // R
    arrived = _expected_rows(x.cpu(), fmt).to(torch.bfloat16).float().to(x.device)
    y = (arrived.unsqueeze(1) * (1 + topk_idx.clamp(min=0) / 8).unsqueeze(2)).to(torch.bfloat16).float()
    ok = (topk_idx >= 0) & torch.tensor(answers, device=x.device)[topk_idx.clamp(min=0) // L]
    terms = torch.where(ok.unsqueeze(2), weights.unsqueeze(2) * y, 0.0)
    want, scale = terms.sum(1), terms.abs().sum(1)
    assert combined.dtype == torch.bfloat16 and combined.shape == x.shape
    diff = (combined.float() - want).abs()
    assert (diff <= scale * 2 ** -7 + 1e-6).all(), f"max diff {diff.max()}"


def _round_trip(buf, device, rank, R, E, seed, fmt, hook=False, carry=False, zero_copy=False, async_finish=False):
    x, topk_idx, weights = _inputs(rank, R, E, seed, device)
    use_fp8, round_scale, use_ue8m0 = fmt
    L = E // R
    stats = torch.zeros(L, dtype=torch.int32, device=x.device)
    extra = {"topk_weights": weights} if carry else {}
    recv, count, handle, event, recv_hook = buf.low_latency_dispatch(
        x, topk_idx, M, E, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8, round_scale=round_scale,
        use_ue8m0=use_ue8m0, async_finish=async_finish, return_recv_hook=hook, **extra)
    assert (recv_hook is not None) == hook
    if hook:
        recv_hook()
        with pytest.raises(RuntimeError, match="twice"):
            recv_hook()
    elif async_finish:
        event.current_stream_wait()
    assert torch.equal(stats, count)
    y = _expert(_dequant(recv, fmt).to(torch.bfloat16), rank, L)
    if zero_copy:
        buf.get_next_low_latency_combine_buffer(handle)[:] = y
    combined, event, recv_hook = buf.low_latency_combine(y, topk_idx, None if carry else weights, handle,
                                                         zero_copy=zero_copy, return_recv_hook=hook,
                                                         async_finish=async_finish)
    if hook:
        recv_hook()
    elif async_finish:
        event.current_stream_wait()
    return (x, topk_idx, weights), recv, count, handle, combined


def _talk_all(R):
    return [True] * R


def _worker(rank, R, expect_nodes, device_kind):
    """One rank: epkern.Buffer picks the collective engine; every format, hook, carried weights, zero
    copy, async, then masking. device_kind: "cpu" (gloo) or "cuda" (NCCL)."""
    import torch.distributed as dist

    import epkern

    E = 4 * R
    buffer = epkern.Buffer(dist.group.WORLD, num_rdma_bytes=epkern.get_low_latency_rdma_size_hint(M, H, R, E),
                           low_latency_mode=True, timeout_s=20.0)
    ll = buffer._low_latency
    assert type(ll).__name__ == "CollectiveLowLatency" and buffer.num_nodes == expect_nodes
    assert ll.device.type == device_kind
    for seed, (name, fmt) in enumerate(FORMATS.items()):
        base = _round_trip(buffer, ll.device, rank, R, E, seed, fmt)
        (x, topk_idx, weights), recv, count, handle, combined = base
        _check_dispatch(rank, R, E, seed, recv, count, handle, fmt, _talk_all(R), device_kind)
        _check_combine(combined, x, topk_idx, weights, R, E, fmt, _talk_all(R))
        for options in (dict(hook=True), dict(carry=True), dict(zero_copy=True), dict(async_finish=True),
                        dict(hook=True, carry=True, zero_copy=True)):
            other = _round_trip(buffer, ll.device, rank, R, E, seed, fmt, **options)
            assert torch.equal(other[2], count), f"{name} {options}: counts differ"
            assert torch.equal(other[4], combined), f"{name} {options}: combine differs"
            if options.get("carry"):
                h = other[3]
                sent = torch.tensor([TOKENS[r % len(TOKENS)] for r in range(R)], dtype=torch.int32)
                assert torch.equal(h.recv_tokens.cpu(), sent)
                assert h.carries_weights and h.token_weights.shape == (R, M, K)

    # masking: rank 0 masks rank 1, so neither sends the other tokens nor reads the other's rows
    status = torch.zeros(R, dtype=torch.int32, device=ll.device)
    if rank == 0:
        buffer.low_latency_update_mask_buffer(1, True)
    talks = [not ({rank, r} == {0, 1}) for r in range(R)]
    res = _round_trip(buffer, ll.device, rank, R, E, 7, FORMATS["bf16"])
    _check_dispatch(rank, R, E, 7, res[1], res[2], res[3], FORMATS["bf16"], talks, device_kind)
    _check_combine(res[4], *res[0], R, E, FORMATS["bf16"], talks)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [int(rank == 0 and r == 1) for r in range(R)]
    buffer.low_latency_clean_mask_buffer()
    buffer.clean_low_latency_buffer(M, H, E)
    res = _round_trip(buffer, ll.device, rank, R, E, 7, FORMATS["bf16"], hook=True)
    _check_dispatch(rank, R, E, 7, res[1], res[2], res[3], FORMATS["bf16"], _talk_all(R), device_kind)
    assert buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True).numel() == buffer.num_rdma_bytes
    buffer.destroy()


def test_four_ranks_two_nodes():
    multiproc.run(_worker, 4, "cpu", 2, "cpu", env={"EPKERN_RANKS_PER_NODE": "2"}, timeout_s=120)


def _errors_worker(rank, R):
    """Bad input (raised on each rank before anything is sent), disagreement and a missing rank."""
    import torch.distributed as dist

    import epkern
    from epkern.internode.low_latency import CollectiveLowLatency
    from epkern.normal.nvlink import PeerTimeoutError

    E = 4 * R
    group = dist.group.WORLD
    buffer = epkern.Buffer(group, num_rdma_bytes=1 << 20, low_latency_mode=True, timeout_s=1.5)
    ll = buffer._low_latency
    assert type(ll).__name__ == "CollectiveLowLatency" and buffer.num_nodes == 1   # one host, no GPU peer memory
    x, topk_idx, weights = _inputs(rank, R, E, 0, "cpu", num_tokens=4)   # tokens on both ranks: both raise
    checks = [
        (TypeError, "x: dtype", lambda: buffer.low_latency_dispatch(x.float(), topk_idx, M, E)),
        (ValueError, "out of range", lambda: buffer.low_latency_dispatch(x, topk_idx + E, M, E)),
        (ValueError, "exceed", lambda: buffer.low_latency_dispatch(x, topk_idx, 3, E)),
        (ValueError, "divisible", lambda: buffer.low_latency_dispatch(x, topk_idx, M, E + 1)),
        (ValueError, "multiple of 128", lambda: buffer.low_latency_dispatch(x[:, :200].contiguous(), topk_idx, M, E)),
        (ValueError, "round_scale", lambda: buffer.low_latency_dispatch(x, topk_idx, M, E, use_ue8m0=True)),
        (ValueError, "return_recv_hook",
         lambda: buffer.low_latency_dispatch(x, topk_idx, M, E, async_finish=True, return_recv_hook=True)),
        (ValueError, "topk_weights",
         lambda: buffer.low_latency_dispatch(x, topk_idx, M, E, topk_weights=weights[:, :1].contiguous())),
        (ValueError, "cumulative_local_expert_recv_stats", lambda: buffer.low_latency_dispatch(
            x, topk_idx, M, E, cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32))),
        (ValueError, "CUDA tensors need an NCCL group", lambda: CollectiveLowLatency(group, 1 << 20, device="cuda")),
    ]
    for exc, match, call in checks:
        with pytest.raises(exc, match=match):
            call()
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
    y = recv.clone()
    for exc, match, call in [
        (TypeError, "plain 5-tuple", lambda: buffer.low_latency_combine(y, topk_idx, weights, tuple(handle))),
        (ValueError, "x: dimension 1", lambda: buffer.low_latency_combine(y[:, :4].contiguous(), topk_idx, weights,
                                                                           handle)),
        (ValueError, "topk_weights", lambda: buffer.low_latency_combine(y, topk_idx, None, handle)),
        (ValueError, "columns", lambda: buffer.low_latency_combine(y, topk_idx[:, :2].contiguous(),
                                                                    weights[:, :2].contiguous(), handle)),
    ]:
        with pytest.raises(exc, match=match):
            call()
    buffer.low_latency_combine(y, topk_idx, weights, handle)

    # ranks that disagree on the configuration raise the same error, before any data moves
    bad = x[:, :128].contiguous() if rank == 1 else x
    with pytest.raises(ValueError, match="disagree on hidden"):
        buffer.low_latency_dispatch(bad, topk_idx, M, E, use_fp8=False)
    # a rank that skips a call is named by the others after timeout_s
    if rank == 0:
        with pytest.raises(PeerTimeoutError, match="rank 1 did not arrive"):
            buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
    return True


def test_two_ranks_one_node_without_peer_memory():
    """2 CPU ranks on one host: no CUDA peer memory, so the collective engine; bad input, a
    disagreement and a missing rank; and the round trip of every format."""
    assert multiproc.run(_errors_worker, 2, "cpu", timeout_s=120) == [True, True]
    multiproc.run(_worker, 2, "cpu", 1, "cpu", timeout_s=120)


# -- GPU -----------------------------------------------------------------------------------------------
def _gpu_worker(rank, R):
    """World size 1 over NCCL (the collective itself runs: NCCL's kernel): CUDA results equal the CPU
    blocks' bit for bit, and dispatch + expert + combine with hooks captures into a CUDA graph."""
    import torch.distributed as dist

    from epkern.internode import low_latency_blocks as blocks
    from epkern.internode.low_latency import CollectiveLowLatency

    E = 4
    ll = CollectiveLowLatency(dist.group.WORLD, 1 << 20)
    assert ll.device.type == "cuda"
    for seed, (name, fmt) in enumerate(FORMATS.items()):
        inputs, recv, count, handle, combined = _round_trip(ll, ll.device, rank, R, E, seed, fmt, hook=True)
        x, topk_idx, weights = inputs
        _check_dispatch(rank, R, E, seed, recv, count, handle, fmt, [True], "cuda")
        _check_combine(combined, x, topk_idx, weights, R, E, fmt, [True])
        # the same blocks on CPU (the FP8 cast kernel and its CPU reference agree bit for bit)
        rows = blocks.DispatchRows(name, H, K)
        send = blocks.pack_dispatch(rows, x.cpu(), topk_idx.cpu(), None, M, 1, torch.zeros(1, dtype=torch.int32))
        gpu_send = blocks.pack_dispatch(rows, x, topk_idx, None, M, 1, ll.mask)
        T = x.shape[0]
        assert torch.equal(gpu_send[:, :T].cpu(), send[:, :T]) and torch.equal(gpu_send[:, M].cpu(), send[:, M])

    x, topk_idx, weights = _inputs(rank, R, E, 3, "cuda")
    static = torch.empty_like(x)

    def step():
        recv, _, handle, _, hook = ll.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True, round_scale=True,
                                                          use_ue8m0=True, return_recv_hook=True)
        hook()
        y = _expert(_dequant(recv, FORMATS["fp8_ue8m0"]).to(torch.bfloat16), rank, E)
        _, _, hook = ll.low_latency_combine(y, topk_idx, weights, handle, out=static, return_recv_hook=True)
        hook()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    eager = static.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        static.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, eager), "graph replay differs from eager"


@pytest.mark.gpu
def test_collective_engine_on_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    multiproc.run(_gpu_worker, 1, "nccl", timeout_s=300)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_two_gpus_as_two_nodes():
    """Two NCCL ranks, each its own "node" (EPKERN_RANKS_PER_NODE=1), peer-to-peer off so NCCL keeps
    to its network transports: the CPU test's checks on CUDA tensors."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    multiproc.run(_worker, 2, "nccl", 2, "cuda", timeout_s=300,
                  env={"EPKERN_RANKS_PER_NODE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"})
