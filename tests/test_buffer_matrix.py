"""The normal-mode option matrix, run on every rank of a group by the backend tests.

`run_matrix(buffer, ...)` checks dispatch / cached dispatch / combine against a reference built
from all ranks' inputs (all-gathered): rows encode (source rank, token), so every received row is
checked for its origin. Used by test_buffer_torch.py (gloo, CPU) and test_intranode_gpu.py (both
backends on GPUs). The single-process tests at the bottom cover the pure helpers.
"""
from __future__ import annotations

import itertools

import torch

from epkern.normal.handle import aligned_counts, send_head_from_counts
from epkern.testing.multiproc import all_gather


def token_rows(rank: int, num_tokens: int, hidden: int, device) -> torch.Tensor:
    """Small integers (exact in bf16 and e4m3) that name the source rank and token."""
    t = torch.arange(num_tokens, device=device).view(-1, 1)
    cols = torch.arange(hidden, device=device).view(1, -1)
    x = ((rank * 3 + t * 5 + cols) % 13).float()
    x[:, 0] = rank
    x[:, 1] = t[:, 0] % 16
    x[:, 2] = t[:, 0] // 16 % 16
    return x


def make_inputs(rank, num_tokens, hidden, num_experts, num_topk, gen, device):
    scores = torch.rand(num_tokens, num_experts, generator=gen).to(device)
    topk_idx = torch.topk(scores, num_topk, dim=-1).indices.to(torch.int64)
    drop = torch.rand(num_tokens, num_topk, generator=gen).to(device) < 0.1
    topk_idx = topk_idx.masked_fill(drop, -1)
    if num_tokens > 3:
        topk_idx[3] = -1  # a token that goes nowhere
    weights = (torch.randint(1, 9, (num_tokens, num_topk), generator=gen).float() / 8).to(device)
    return token_rows(rank, num_tokens, hidden, device), topk_idx, weights


def reference(all_x, all_topk, all_w, rank, num_ranks, num_experts):
    """What `rank` must receive: rows by source rank then token; local ids; weights; src index."""
    epr = num_experts // num_ranks
    lo, hi = rank * epr, (rank + 1) * epr
    rows, idx, w, src, counts = [], [], [], [], []
    for s in range(num_ranks):
        hit = ((all_topk[s] >= lo) & (all_topk[s] < hi)).any(dim=1)
        tokens = hit.nonzero().view(-1)
        counts.append(len(tokens))
        rows.append(all_x[s][tokens])
        local = all_topk[s][tokens] - lo
        ok = (all_topk[s][tokens] >= lo) & (all_topk[s][tokens] < hi)
        idx.append(torch.where(ok, local, torch.full_like(local, -1)))
        w.append(torch.where(ok, all_w[s][tokens], torch.zeros_like(all_w[s][tokens])))
        src.append(tokens.to(torch.int32))
    per_expert = [sum(int((t == e).sum()) for t in all_topk) for e in range(lo, hi)]
    return torch.cat(rows), torch.cat(idx), torch.cat(w), torch.cat(src), counts, per_expert


def _wait(event, async_finish):
    if async_finish:
        event.current_stream_wait()


def _cast_fp8(x):
    """Per-token FP8 with scale 1 per 128 columns times (rank + 1): exact for small integers."""
    data = x.to(torch.float8_e4m3fn)
    scales = torch.ones(x.shape[0], x.shape[1] // 128, dtype=torch.float32, device=x.device)
    scales *= x[:, :1] + 1
    return data, scales


def run_matrix(buffer, group, rank, num_ranks, device, seed, *, num_tokens=67, hidden=256, num_experts=None,
               num_topk=4, quick=False):
    num_experts = num_experts or 4 * num_ranks
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    x, topk_idx, topk_weights = make_inputs(rank, num_tokens, hidden, num_experts, num_topk, gen, device)
    all_x = all_gather(x, group)
    all_topk = all_gather(topk_idx, group)
    all_w = all_gather(topk_weights, group)
    ref_rows, ref_idx, ref_w, ref_src, ref_counts, ref_per_expert = reference(
        all_x, all_topk, all_w, rank, num_ranks, num_experts)

    # layout equals the reference
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    assert per_rdma is None
    epr = num_experts // num_ranks
    valid = topk_idx >= 0
    expect_in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)
    for r in range(num_ranks):
        expect_in_rank[:, r] = (valid & (topk_idx // epr == r)).any(dim=1)
    assert torch.equal(in_rank, expect_in_rank)
    assert per_rank.tolist() == expect_in_rank.sum(0).tolist()
    assert per_expert.tolist() == torch.bincount(topk_idx[valid], minlength=num_experts).tolist()
    reached = in_rank.sum(1, keepdim=True)

    cases = itertools.product((False, True), (False, True), (False, True), (False, True), (0, 1), (1, 4))
    for fp8, with_topk, async_finish, previous, worst, alignment in cases:
        if quick and (async_finish != previous or alignment != 1 + 3 * worst):
            continue
        label = f"fp8={fp8} topk={with_topk} async={async_finish} previous={previous} worst={worst} align={alignment}"
        bf16 = x.to(torch.bfloat16)
        xin = _cast_fp8(x) if fp8 else bf16
        num_worst = num_tokens * num_ranks if worst else 0
        args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                    expert_alignment=alignment, num_worst_tokens=num_worst, async_finish=async_finish)
        if with_topk:
            args.update(topk_idx=topk_idx, topk_weights=topk_weights)
        if previous:
            args["previous_event"] = buffer.capture()
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(xin, **args)
        _wait(event, async_finish)
        n = len(ref_rows)
        rows = max(n, num_worst)
        got = recv_x[0].float() if fp8 else recv_x.float()
        assert got.shape == (rows, hidden), label
        assert torch.equal(got[:n], ref_rows.float()), label
        if fp8:
            assert torch.equal(recv_x[1][:n], (ref_rows[:, :1] + 1).expand(n, hidden // 128)), label
        assert torch.equal(handle[0][:, rank].cpu(), torch.tensor(ref_counts).cumsum(0).to(torch.int32)), label
        assert torch.equal(handle[3][:n].cpu(), ref_src.cpu()), label
        assert counts == ([] if worst else aligned_counts(ref_per_expert, alignment)), label
        if with_topk:
            assert torch.equal(recv_idx[:n], ref_idx), label
            assert torch.equal(recv_w[:n], ref_w), label
            assert bool((recv_idx[n:] == -1).all()), label
        else:
            assert recv_idx is None and recv_w is None, label

        # cached dispatch repeats the layout
        if not with_topk:
            cargs = dict(handle=handle, async_finish=async_finish)
            if previous:
                cargs["previous_event"] = buffer.capture()
            again, none1, none2, none3, none4, event = buffer.dispatch(xin, **cargs)
            _wait(event, async_finish)
            assert (none1, none2, none3, none4) == (None, None, None, None), label
            # a second call of the signature takes the kept plan (epkern/normal/plans.py) on the NVLink backend
            twice = buffer.dispatch(xin, handle=handle)[0]
            for got_again in (again, twice):
                if fp8:
                    assert got_again[0].dtype == recv_x[0].dtype and got_again[1].dtype == recv_x[1].dtype, label
                    assert torch.equal(got_again[0][:n].float(), recv_x[0][:n].float()), label
                    assert torch.equal(got_again[1][:n], recv_x[1][:n]), label
                else:
                    assert torch.equal(got_again[:n], recv_x[:n]), label

        # combine: each token times the number of ranks it reached; reduced top-k weights
        expert_out = got.to(torch.bfloat16)
        cargs = dict(async_finish=async_finish)
        if with_topk:
            cargs["topk_weights"] = recv_w
        if previous:
            cargs["previous_event"] = buffer.capture()
        combined, combined_w, event = buffer.combine(expert_out, handle, **cargs)
        _wait(event, async_finish)
        assert torch.equal(combined.float(), bf16.float() * reached), label
        cargs.pop("previous_event", None)
        combined_again, _, event = buffer.combine(expert_out, handle, **cargs)   # the kept plan, if any
        _wait(event, async_finish)
        assert torch.equal(combined_again, combined), label
        if with_topk:
            expect_w = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
            assert torch.equal(combined_w, expect_w), label
        else:
            assert combined_w is None, label

    # combine with bias: added once per token
    recv_x, _, _, _, handle, _ = buffer.dispatch(x.to(torch.bfloat16), num_tokens_per_rank=per_rank,
                                                 is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    bias = torch.ones(num_tokens, hidden, dtype=torch.bfloat16, device=device)
    combined, _, _ = buffer.combine(recv_x, handle, bias=(bias, bias))
    assert torch.equal(combined.float(), x * reached + 2)


def check_validation(buffer, num_ranks, device):
    """Bad input raises a clear error before any communication (the same on every rank)."""
    import pytest

    T, H, E = 8, 128, 4 * num_ranks
    x = torch.zeros(T, H, dtype=torch.bfloat16, device=device)
    topk = torch.zeros(T, 2, dtype=torch.int64, device=device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, E)
    base = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        buffer.dispatch(torch.zeros(T, 12, dtype=torch.bfloat16, device=device), **base)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        buffer.dispatch(torch.zeros(T, 1, dtype=torch.int64, device=device), **base)
    with pytest.raises(TypeError, match="1-byte elements"):
        buffer.dispatch((x, torch.ones(T, 1, device=device)), **base)
    with pytest.raises(TypeError, match=r"x\[1\]: dtype"):
        buffer.dispatch((x.to(torch.float8_e4m3fn), torch.ones(T, 1, dtype=torch.float64, device=device)), **base)
    with pytest.raises(ValueError, match="topk_idx: value"):
        buffer.dispatch(x, topk_idx=topk + E, topk_weights=torch.ones(T, 2, device=device), **base)
    with pytest.raises(ValueError, match="together"):
        buffer.dispatch(x, topk_idx=topk, **base)
    with pytest.raises(ValueError, match="is_token_in_rank is required"):
        buffer.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert)
    with pytest.raises(ValueError, match=r"x\[1\]: dimension 0"):
        buffer.dispatch((x.to(torch.float8_e4m3fn), torch.ones(T + 1, 1, device=device)), **base)
    with pytest.raises(ValueError, match="allocate_on_comm_stream"):
        buffer.dispatch(x, allocate_on_comm_stream=True, **base)
    with pytest.raises(ValueError, match="expert_alignment"):
        buffer.dispatch(x, expert_alignment=0, **base)
    _, _, _, _, handle, _ = buffer.dispatch(x, **base)
    with pytest.raises(ValueError, match="cached mode"):
        buffer.dispatch(x, handle=handle, topk_idx=topk, topk_weights=torch.ones(T, 2, device=device))
    with pytest.raises(ValueError, match="dimension 0"):
        buffer.combine(torch.zeros(handle[3].shape[0] + 1, H, dtype=torch.bfloat16, device=device), handle)
    with pytest.raises(TypeError, match="handle"):
        buffer.combine(x, handle[:3])


# -- single-process tests of the helpers ------------------------------------------------------------
def test_send_head_encodes_slots_and_gaps():
    in_rank = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=torch.bool)
    prefix = torch.tensor([[5, 1], [9, 4]], dtype=torch.int32)  # rank 1: bases are row 0
    head = send_head_from_counts(in_rank, prefix, rank=1)
    assert head.tolist() == [[5, -2], [-7, -2], [6, 1], [-8, 2]]


def test_aligned_counts():
    assert aligned_counts([0, 1, 4, 5], 4) == [0, 4, 4, 8]
    assert aligned_counts([3], 1) == [3]


def test_config_size_hint_grows_with_tokens_and_ranks():
    from epkern import buffer as B

    c = B.Config(24)
    small = c.get_nvl_buffer_size_hint(7168 * 2, 2, num_max_tokens=128)
    big = c.get_nvl_buffer_size_hint(7168 * 2, 8, num_max_tokens=4096)
    assert 0 < small < big
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    import pytest

    with pytest.raises(ValueError, match="num_sms"):
        B.Config(0)
