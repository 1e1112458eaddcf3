"""epkern.moe on CPU: the layer's math against a per-token reference, the router, and (2 processes,
gloo, the torch backend) the distributed layer against the single-process one, overlapped against
serial (bit for bit), and with the LPLB planner against without it."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from epkern.fp8 import per_token_cast_back, per_token_cast_to_fp8
from epkern.moe import MoE, route

H, I, E, K, SHARED = 256, 64, 8, 3, 128


def _x(seed: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, H, generator=g).to(torch.bfloat16)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, scale: float = 1.0) -> None:
    # a few bf16 roundings apart (partial sums rounded per rank, then once more)
    err = (a.float() - b.float()).abs()
    bound = scale * (2 ** -6 * b.float().abs() + 2 ** -6 * b.float().abs().mean())
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.4g} (bound {bound.max().item():.4g})"


def _per_token_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Loops over tokens and their experts with F.linear: the same math as the grouped GEMMs."""
    idx, w = layer.route(x)
    xq = per_token_cast_back(*per_token_cast_to_fp8(x))
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(K):
            e = int(idx[t, k])
            h = F.linear(xq[t:t + 1], layer.w13[e])
            act = (F.silu(h[:, :I].float()) * h[:, I:].float() * w[t, k]).to(torch.bfloat16)
            out[t] += F.linear(act, layer.w2[e]).float()[0]
        if layer.shared_w13 is not None:
            h = F.linear(x[t:t + 1], layer.shared_w13)
            act = (F.silu(h[:, :SHARED].float()) * h[:, SHARED:].float()).to(torch.bfloat16)
            out[t] += F.linear(act, layer.shared_w2).float()[0]
    return out.to(torch.bfloat16)


def test_local_layer_matches_per_token_reference():
    layer = MoE(H, I, E, K, shared_intermediate=SHARED, seed=3)
    x = _x(1, 37)
    _close(layer(x), _per_token_reference(layer, x), "single-process layer")


def test_router_group_limited():
    # 2 tokens, 8 experts in 4 groups of 2; bias only picks, the weights are the unbiased scores
    gate = torch.eye(8, 4)
    x = torch.tensor([[3.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0]])
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 0.0, 5.0])
    idx, w = route(x, gate, 2, score_func="sigmoid", n_group=4, topk_group=2, e_score_correction_bias=bias,
                   routed_scaling_factor=2.0)
    s = torch.sigmoid(x @ gate.t())
    assert idx[0].tolist() == [7, 0]   # group 3 (bias) and group 0 (expert 0); expert 3 is cut with group 1
    assert torch.allclose(w[0], 2.0 * s[0, [7, 0]] / s[0, [7, 0]].sum())
    idx, w = route(x, gate, 2, score_func="softmax")
    assert idx[1, 0].item() == 1 and torch.allclose(w.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="n_group"):
        MoE(H, I, E, K, n_group=3)
    with pytest.raises(ValueError, match="score_func"):
        MoE(H, I, E, K, score_func="relu")


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from epkern import Buffer
        from epkern.solver import Planner, ring

        buffer = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 24, backend="torch")
        opts = dict(shared_intermediate=SHARED, seed=5, score_func="sigmoid", n_group=4, topk_group=2,
                    correction_bias=True, routed_scaling_factor=1.5)
        reference = MoE(H, I, E, K, **opts)
        x = _x(100 + rank, 45 + 6 * rank)   # ranks hold different token counts
        want = reference(x)
        for mode in ("prefill", "decode"):   # decode: the normal-mode torch backend (no low-latency on CPU)
            for n in (1, 2, 3):
                layer = MoE(H, I, E, K, buffer=buffer, mode=mode, num_microbatches=n, **opts)
                assert layer.local_experts == list(range(4 * rank, 4 * rank + 4))
                layer.overlap = True
                overlapped = layer(x)
                layer.overlap = False
                serial = layer(x)
                assert torch.equal(overlapped, serial), f"{mode} x{n}: overlapped != serial"
                _close(overlapped, want, f"{mode} x{n} vs single process")
        # LPLB: one redundant slot per rank (ring of 2), each a copy of a logical expert of the other rank
        planner = Planner(ring(2), 10, E, group=dist.group.WORLD)
        layer = MoE(H, I, E, K, buffer=buffer, planner=planner, **opts)
        assert layer.w13.shape[0] == 5 and layer.local_experts[:4] == planner.phy2log[5 * rank:5 * rank + 4].tolist()
        idx, _ = layer.route(x)
        copies = torch.tensor([4, 9])
        assert bool(torch.isin(idx, copies).any()), "the planner sent nothing to the redundant copies"
        _close(layer(x), want, "with the planner")
        buffer.destroy()
    finally:
        dist.destroy_process_group()


def test_distributed_layer_gloo_two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)


def test_low_latency_layout_experts_match_per_expert_mlp():
    """The device-side compaction of [L, R*M, H] rows (searchsorted over the counts) feeds each expert
    exactly its valid rows: run on CPU with FP8 rows and against a plain per-expert MLP."""
    from epkern.moe import experts_low_latency

    layer = MoE(H, I, 4, 2, seed=9)
    L, RM = 4, 10
    g = torch.Generator().manual_seed(4)
    x = torch.randn(L * RM, H, generator=g).to(torch.bfloat16)
    q, s = per_token_cast_to_fp8(x)
    recv = (q.view(L, RM, H), s.view(L, RM, -1).transpose(1, 2).contiguous().transpose(1, 2))  # column-major scales
    for counts in ([3, 0, 10, 1], [0, 0, 0, 0], [10, 10, 0, 0]):
        count = torch.tensor(counts, dtype=torch.int32)
        out = experts_low_latency(recv, count, 2, layer.w13, layer.w2)
        assert out.shape == (L, RM, H)
        xb = per_token_cast_back(q, s).view(L, RM, H)
        for e, n in enumerate(counts):
            if n:
                h = F.linear(xb[e, :n], layer.w13[e])
                act = (F.silu(h[:, :I].float()) * h[:, I:].float()).to(torch.bfloat16)
                assert torch.equal(out[e, :n], F.linear(act, layer.w2[e])), f"counts {counts}, expert {e}"


class _EmulatedLowLatency:
    """DeepEP's low-latency API over gloo collectives, for the decode stages on CPU (epkern's own
    low-latency mode needs CUDA peer memory). Same layouts: recv_x [L, R*M, H] ordered by source
    rank then token, recv_count [L]; combine sums w * row per token. Sends gather at once, receives
    fill the outputs when the hook runs; a hook called before its send's peers arrive cannot happen
    here (gloo collectives block), so this checks the stages' plumbing, not timing."""

    low_latency_mode = True

    def __init__(self, group):
        self.group, self.rank, self.group_size = group, dist.get_rank(group), dist.get_world_size(group)
        self._low_latency = self

    def _gather(self, t):
        parts = [torch.empty_like(t) for _ in range(self.group_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=True,
                             return_recv_hook=False, topk_weights=None):
        M, R, H = num_max_dispatch_tokens_per_rank, self.group_size, x.shape[1]
        L = num_experts // R
        pad = lambda t, v: torch.cat([t, t.new_full((M - t.shape[0],) + t.shape[1:], v)])  # noqa: E731
        xs, idxs = self._gather(pad(x, 0)), self._gather(pad(topk_idx, -1))
        recv = torch.zeros(L, R * M, H, dtype=torch.bfloat16)
        count = torch.zeros(L, dtype=torch.int32)
        rows = {}
        for l in range(L):
            for src in range(R):
                for t in range(M):
                    if bool((idxs[src][t] == self.rank * L + l).any()):
                        n = int(count[l])
                        recv[l, n], rows[(src, t, l)] = xs[src][t], n
                        count[l] += 1
        out = recv
        if use_fp8:
            q, s = per_token_cast_to_fp8(recv.view(-1, H))
            out = (q.view(L, R * M, H), s.view(L, R * M, -1))
        return out, count, (rows, M, L), None, lambda: None

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, return_recv_hook=False):
        rows, M, L = handle
        R, H = self.group_size, x.shape[2]
        w_all = self._gather(torch.cat([topk_weights, topk_weights.new_zeros(M - topk_weights.shape[0], topk_weights.shape[1])]))
        idx_all = self._gather(torch.cat([topk_idx, topk_idx.new_full((M - topk_idx.shape[0], topk_idx.shape[1]), -1)]))
        partial = torch.zeros(R, M, H)
        for (src, t, l), n in rows.items():
            k = int((idx_all[src][t] == self.rank * L + l).nonzero()[0])
            partial[src, t] += w_all[src][t, k] * x[l, n].float()
        back = [torch.empty(M, H, dtype=torch.bfloat16) for _ in range(R)]
        dist.all_to_all(back, list(partial.to(torch.bfloat16).unbind(0)), group=self.group)
        combined = torch.stack(back).float().sum(0)[:topk_idx.shape[0]].to(torch.bfloat16)
        return combined, None, lambda: None


def _ll_worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        buffer = _EmulatedLowLatency(dist.group.WORLD)
        opts = dict(shared_intermediate=SHARED, seed=11, num_max_dispatch_tokens_per_rank=12)
        x = _x(200 + rank, 20 + 2 * rank)
        layer = MoE(H, I, E, K, buffer=buffer, mode="decode", **opts)
        assert layer.decode_path == "low_latency" and layer._ll_weights
        overlapped = layer(x)
        layer.overlap = False
        assert torch.equal(overlapped, layer(x)), "decode: overlapped != serial"
        _close(overlapped, MoE(H, I, E, K, **opts)(x), "decode stages vs single process")
        with pytest.raises(ValueError, match="at most 2 micro-batches"):
            MoE(H, I, E, K, buffer=buffer, mode="decode", num_microbatches=3, **opts)(x)
        with pytest.raises(ValueError, match="exceed num_max_dispatch_tokens_per_rank"):
            layer.num_microbatches = 1
            layer(x)
    finally:
        dist.destroy_process_group()


def test_decode_stages_over_an_emulated_low_latency_buffer():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ll_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)
