"""Low-latency extensions on the GPU, two ranks sharing one GPU over gloo (or one GPU each):

- the handle unpacks into DeepEP's five fields and a rebuilt tuple is refused;
- topk_weights= on dispatch (the weights travel with the tokens): combine equals the combine
  without it bit for bit, and its send half finishes while the other rank has not started combine;
- use_logfmt=True: within the LogFMT bound of the bf16 combine, exact where no group was encoded;
- bf16 hidden 2880 (GPT-OSS; rows a multiple of 16 bytes, not of 128 channels), LogFMT with its tail.

    python3 -m pytest -q -m gpu tests/test_low_latency_extensions_gpu.py
"""
import datetime
import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu]

T, M, E, K = 50, 64, 32, 8
H_FP8, H_ODD = 2944, 2880   # 23 scale groups; 22 groups + 64 tail channels (not a multiple of 128)
FORMATS = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(rank: int, seed: int, hidden: int, small: bool = False):
    """Rows that encode their origin (value rank - 128, last 64 columns the token index), or, with
    small=True, LogFMT material: values ~0.01 (encoded groups: partial rows stay below 1), every 4th
    group x10^4 (each partial row's amax >= 1 there: sent as bf16),
    a zero group per token, one value per token far below its group's amax (clipped range)."""
    g = torch.Generator(device="cuda").manual_seed(seed * 100 + rank)
    if small:
        x = torch.randn(T, hidden, generator=g, device="cuda") * 0.01
        groups = hidden // 128
        for grp in range(3, groups, 4):
            x[:, 128 * grp:128 * grp + 128] *= 1e4
        x[:, 128:256] = 0
        x[:, 300] = 1e-30
        x = x.to(torch.bfloat16)
    else:
        x = torch.full((T, hidden), rank - 128, dtype=torch.bfloat16, device="cuda")
        x[:, -64:] = torch.arange(T, device="cuda").to(torch.bfloat16).view(-1, 1)
    scores = torch.rand(T, E, generator=g, device="cuda") + 1
    topk_idx = torch.topk(scores, K, dim=-1).indices
    drop = torch.randint(0, T * K, (10,), generator=g, device="cuda")
    topk_idx.view(-1)[drop] = -1
    topk_idx[rank] = torch.arange(K, device="cuda")   # every expert on rank 0
    topk_idx[2 + rank] = -1                           # no expert at all
    weights = torch.rand(T, K, generator=g, device="cuda") + 0.1
    return x, topk_idx, weights


def _dequant(recv, use_fp8: bool, use_ue8m0: bool, hidden: int) -> torch.Tensor:
    if not use_fp8:
        return recv.clone()
    q, scales = recv
    if use_ue8m0:
        b = scales.contiguous().view(torch.uint8).view(*scales.shape[:2], -1)[..., :hidden // 128].to(torch.int32)
        scales = torch.ldexp(torch.ones_like(b, dtype=torch.float32), b - 127)
    return (q.float() * scales.float().repeat_interleave(128, dim=-1)).to(torch.bfloat16)


def _round_trip(buf, x, topk_idx, weights, fmt=(False, False, False), hook=False, zero_copy=False, carry=False,
                logfmt=False, combine_weights="same"):
    use_fp8, round_scale, use_ue8m0 = fmt
    hidden = x.shape[1]
    recv, count, handle, event, recv_hook = buf.low_latency_dispatch(
        x, topk_idx, M, E, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
        return_recv_hook=hook, topk_weights=weights if carry else None)
    if hook:
        recv_hook()
    gemm = _dequant(recv, use_fp8, use_ue8m0, hidden)
    if zero_copy:
        buf.get_next_low_latency_combine_buffer(handle)[:] = gemm
    w = weights if combine_weights == "same" else None
    combined, _, recv_hook = buf.low_latency_combine(gemm, topk_idx, w, handle, use_logfmt=logfmt,
                                                     zero_copy=zero_copy, return_recv_hook=hook)
    if hook:
        recv_hook()
    return recv, count, handle, combined


def _gather(t, num_ranks):
    import torch.distributed as dist

    parts = [torch.empty_like(t, device="cpu") for _ in range(num_ranks)]
    dist.all_gather(parts, t.contiguous().cpu())
    return [p.cuda() for p in parts]


def _check_handle(buf, x, topk_idx, weights):
    recv, count, handle, combined = _round_trip(buf, x, topk_idx, weights)
    src_info, layout_range, m, hidden, num_experts = handle          # DeepEP's unpacking
    assert isinstance(handle, tuple) and len(handle) == 5
    assert (m, hidden, num_experts) == (M, x.shape[1], E)
    assert src_info.shape == (E // buf.num_ranks, buf.num_ranks * M) and layout_range.dtype == torch.int64
    assert handle.token_rows.shape == (buf.num_ranks, M, K) and not handle.carries_weights
    # a rebuilt tuple has lost token_rows: refused before any launch, on every rank alike
    for bad in (tuple(handle), tuple(handle) + (handle.token_rows, handle.recv_tokens)):
        with pytest.raises(TypeError, match="plain"):
            buf.low_latency_combine(recv, topk_idx, weights, bad)
        with pytest.raises(TypeError, match="plain"):
            buf.get_next_low_latency_combine_buffer(bad)


def _check_carried_weights(buf, rank, num_ranks, seed):
    """Weights carried by dispatch: the same bits as the rendezvous combine, every option."""
    x, topk_idx, weights = _inputs(rank, seed, H_FP8)
    for fmt in FORMATS:
        for hook in (False, True):
            for zero_copy in (False, True):
                ref = _round_trip(buf, x, topk_idx, weights, fmt, hook, zero_copy)
                got = _round_trip(buf, x, topk_idx, weights, fmt, hook, zero_copy, carry=True)
                assert got[2].carries_weights and got[2].token_weights.shape == (num_ranks, M, K)
                assert torch.equal(ref[1], got[1]), "recv_count"
                for l, n in enumerate(ref[1].tolist()):
                    assert torch.equal(ref[2][0][l, :n], got[2][0][l, :n]), "src_info"
                assert torch.equal(ref[3], got[3]), f"format {fmt} hook {hook} zero_copy {zero_copy}: combine differs"
    # combine may leave topk_weights out when the handle carries them
    ref = _round_trip(buf, x, topk_idx, weights)
    got = _round_trip(buf, x, topk_idx, weights, carry=True, combine_weights=None)
    assert torch.equal(ref[3], got[3])
    with pytest.raises(ValueError, match="topk_weights"):
        _round_trip(buf, x, topk_idx, weights, combine_weights=None)   # refused before any launch


def _check_send_half_alone(buf, rank, num_ranks, seed):
    """With carried weights, a rank's combine send completes before any other rank starts its combine."""
    import torch.distributed as dist

    x, topk_idx, weights = _inputs(rank, seed, H_FP8)
    ref = _round_trip(buf, x, topk_idx, weights)[3]
    recv, _, handle, _, hook = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False, return_recv_hook=True,
                                                        topk_weights=weights)
    hook()
    torch.cuda.synchronize()
    dist.barrier()
    status = torch.zeros(num_ranks, dtype=torch.int32, device="cuda")
    # rank 0 sends its combine and waits for the send kernel before rank 1 even launches its own
    for turn in range(num_ranks):
        if turn == rank:
            combined, _, combine_hook = buf.low_latency_combine(recv.clone(), topk_idx, weights, handle,
                                                                return_recv_hook=True)
            torch.cuda.synchronize()   # a send that waited for the other ranks would time out here
            buf.low_latency_query_mask_buffer(status)
            assert status.tolist() == [0] * num_ranks, f"rank {rank}: the send half waited for a peer: {status}"
        dist.barrier()
    combine_hook()
    torch.cuda.synchronize()
    assert torch.equal(combined, ref)
    buf.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0] * num_ranks


def _partials(x, topk_idx, weights, num_ranks):
    """[R, T, H] bf16 partial rows each expert rank sends back for combine of identity experts."""
    L = E // num_ranks
    out = []
    for s in range(num_ranks):
        w = (weights * ((topk_idx >= 0) & (topk_idx // L == s))).sum(-1, keepdim=True)
        out.append((x.float() * w).to(torch.bfloat16))
    return torch.stack(out)


def _check_logfmt(buf, rank, num_ranks, seed, hidden):
    from epkern.low_latency import logfmt

    x, topk_idx, weights = _inputs(rank, seed, hidden, small=True)
    parts = _partials(x, topk_idx, weights, num_ranks)
    bound = sum(logfmt.error_bound(p) for p in parts) + 2 ** -7 * parts.float().abs().sum(0)
    for hook, zero_copy, carry in ((False, False, False), (True, False, True), (False, True, False)):
        # three results held at once: two are copied (DeepEP's rule, kept by epkern: at most two held)
        ref = _round_trip(buf, x, topk_idx, weights, hook=hook, zero_copy=zero_copy, carry=carry)[3].clone()
        got = _round_trip(buf, x, topk_idx, weights, hook=hook, zero_copy=zero_copy, carry=carry,
                          logfmt=True)[3].clone()
        again = _round_trip(buf, x, topk_idx, weights, hook=hook, zero_copy=zero_copy, carry=carry, logfmt=True)[3]
        assert torch.equal(got, again), "LogFMT combine must be deterministic"
        diff = (got.float() - ref.float()).abs()
        # bf16 rounding of the two sums: half an ulp each
        slack = 2 ** -8 * torch.maximum(got.float().abs(), ref.float().abs())
        assert (diff <= bound + slack).all(), f"hidden {hidden}: worst excess {(diff - bound - slack).max()}"
        assert (diff > 0).any(), "no group was LogFMT-encoded"
        assert (got[:, 128:256] == 0).all(), "a zero group must come back zero"
        # channels where no source's group was encoded (amax >= 1 in every group x10^4, the tail): exact
        groups = hidden // 128
        for grp in range(3, groups, 4):
            assert torch.equal(got[:, 128 * grp:128 * grp + 128], ref[:, 128 * grp:128 * grp + 128])
        assert torch.equal(got[:, 128 * groups:], ref[:, 128 * groups:]), "tail channels travel as bf16"


def _check_odd_hidden(buf, rank, num_ranks, seed):
    """bf16 dispatch and combine at hidden 2880: every received row is its source token; combine is exact."""
    x, topk_idx, weights = _inputs(rank, seed, H_ODD)
    all_topk = _gather(topk_idx, num_ranks)
    L = E // num_ranks
    for hook in (False, True):
        recv, count, handle, combined = _round_trip(buf, x, topk_idx, weights, hook=hook, zero_copy=hook)
        src_info, layout_range = handle[0], handle[1]
        for l in range(L):
            e = rank * L + l
            begin = 0
            for r in range(num_ranks):
                tokens = (all_topk[r] == e).any(-1).nonzero().flatten()
                assert int(layout_range[l, r]) >> 32 == begin and int(layout_range[l, r]) & 0xFFFFFFFF == len(tokens)
                rows = recv[l, begin:begin + len(tokens)].float()
                assert torch.equal(src_info[l, begin:begin + len(tokens)].long(), tokens)
                assert (rows[:, :-64] == r - 128).all() and torch.equal(rows[:, -64:], tokens.float().view(-1, 1).expand(-1, 64))
                begin += len(tokens)
            assert int(count[l]) == begin
        ok = (topk_idx >= 0).float()
        want = x.float() * (weights * ok).sum(-1, keepdim=True)
        assert ((combined.float() - want).abs() <= want.abs() * 2 ** -7).all()
    with pytest.raises(ValueError, match="multiple of 128"):
        buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True)


def _worker(rank, num_ranks, port, num_gpus):
    import torch.distributed as dist

    from epkern.codegen import get_module
    from epkern.low_latency import LowLatencyBuffer, get_low_latency_rdma_size_hint
    from epkern.low_latency.kernels import DISPATCH_KINDS, LowLatencySpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank % num_gpus)
    # a failing rank must not leave the other waiting in a gloo barrier for the default 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=num_ranks, timeout=datetime.timedelta(seconds=300))
    buf = LowLatencyBuffer(dist.group.WORLD, get_low_latency_rdma_size_hint(M, H_FP8, num_ranks, E), timeout_s=10.0)
    # compile every kernel first, so no rank waits on another's JIT past the timeout
    for hidden, kinds in ((H_FP8, DISPATCH_KINDS), (H_ODD, ("bf16",))):
        for kind in kinds:
            for carry in (False, True):
                get_module(LowLatencySpec(kind, hidden, num_ranks, E, K, carry_weights=carry))
        for kind in ("combine", "combine_logfmt"):
            get_module(LowLatencySpec(kind, hidden, num_ranks, E, K))
    dist.barrier()
    try:
        x, topk_idx, weights = _inputs(rank, 1, H_FP8)
        _check_handle(buf, x, topk_idx, weights)
        _check_carried_weights(buf, rank, num_ranks, 2)
        _check_send_half_alone(buf, rank, num_ranks, 3)
        for hidden in (H_FP8, H_ODD):
            _check_logfmt(buf, rank, num_ranks, 4, hidden)
        _check_odd_hidden(buf, rank, num_ranks, 5)
        torch.cuda.synchronize()
        dist.barrier()
    finally:
        buf.destroy()
        dist.destroy_process_group()


def test_low_latency_extensions_two_ranks():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    num_gpus = min(torch.cuda.device_count(), 2)
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), num_gpus), nprocs=2, join=True)
