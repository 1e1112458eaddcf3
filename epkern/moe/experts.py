"""Expert MLPs (gate/up/down, SiLU) over received tokens, as grouped GEMMs from torch.

GEMM: `torch.nn.functional.grouped_mm` / `torch._grouped_mm` (PyTorch's CUTLASS grouped GEMM)
on CUDA bf16 where it has its fast kernel (sm90 / sm100): one launch per projection, the group
offsets read on the device, so nothing syncs and CUDA graphs capture it. Elsewhere (CPU, other
GPUs) one `torch.matmul` per expert over its contiguous rows (host-known counts). No
hand-written GEMM.

Rows come in two layouts:
* normal mode: recv_x [N, H] with recv_topk_idx [N, K] (local expert ids, -1 elsewhere) and
  weights; the (row, k) pairs are sorted by expert (stable), run, and each row's pairs summed back
  (fp32) in k order -> [N, H] bf16, the routing weight folded into the activation before the down
  projection (as vLLM/SGLang do).
* low-latency: recv_x [L, R*M, H] with recv_count [L]: the valid rows of every expert are gathered
  into one compact [R*M*min(K, L), H] block on the device (searchsorted over the counts, no host
  sync), run, and scattered back to [L, R*M, H] bf16; combine applies the weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from epkern.fp8 import per_token_cast_back

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def fast_grouped_mm(device: torch.device) -> bool:
    """True where torch's grouped GEMM has its CUTLASS kernel: CUDA bf16 on sm90 / sm100."""
    if _grouped_mm is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def grouped_linear(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """out[rows of group g] = a[rows of group g] @ w[g]^T. a [P, K] bf16, w [G, N, K] bf16.

    ends: int32 [G] group end rows (on a's device); counts: the same on the host, or None (then
    the fast path is required). Rows at or after ends[-1] are left unspecified."""
    if fast_grouped_mm(a.device):
        return _grouped_mm(a, w.transpose(1, 2), offs=ends)
    if counts is None:
        counts = torch.diff(ends.cpu(), prepend=ends.new_zeros(1).cpu()).tolist()
    out = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.matmul(a[start:start + n], w[g].t(), out=out[start:start + n])
        start += n
    return out


def mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ends, counts, row_scale=None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x) [* row_scale]); w13 [G, 2I, H] (gate rows first), w2 [G, H, I]."""
    h = grouped_linear(x, w13, ends, counts)
    inter = w2.shape[2]
    act = F.silu(h[:, :inter].float()) * h[:, inter:].float()
    if row_scale is not None:
        act = act * row_scale.unsqueeze(1)
    return grouped_linear(act.to(x.dtype), w2, ends, counts)


def dense_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The shared expert: the same MLP with one weight set (w13 [2I, H], w2 [H, I])."""
    h = torch.matmul(x, w13.t())
    inter = w2.shape[1]
    act = (F.silu(h[:, :inter].float()) * h[:, inter:].float()).to(x.dtype)
    return torch.matmul(act, w2.t())


def _as_bf16(recv) -> torch.Tensor:
    if isinstance(recv, tuple):
        return per_token_cast_back(recv[0], recv[1].contiguous())
    return recv


def experts_normal(recv_x, recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor,
                   counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Normal-mode rows -> [N, H] bf16: sum over each row's local experts of w * expert(row)."""
    x = _as_bf16(recv_x)
    N, K = recv_topk_idx.shape
    L, H = w13.shape[0], x.shape[1]
    if len(counts) != L:
        raise ValueError(f"counts: {len(counts)} entries, expected one per local expert ({L})")
    flat = recv_topk_idx.reshape(-1)
    order = torch.where(flat >= 0, flat, L).argsort(stable=True)
    P = sum(counts)
    if P == 0:
        return torch.zeros(N, H, dtype=x.dtype, device=x.device)
    pairs = order[:P]
    ends = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(x.device)
    y = mlp(x[pairs // K], w13, w2, ends, counts, row_scale=recv_topk_weights.reshape(-1)[pairs].float())
    # each (row, k) slot -> its pair's output row, or a zero row; summed over k in fp32
    pos = torch.full((N * K,), P, dtype=torch.int64, device=x.device)
    pos[pairs] = torch.arange(P, device=x.device)
    y_ext = torch.cat([y[:P], y.new_zeros(1, H)])
    return y_ext[pos.view(N, K)].sum(dim=1, dtype=torch.float32).to(x.dtype)


def experts_low_latency(recv_x, recv_count: torch.Tensor, num_topk: int, w13: torch.Tensor,
                        w2: torch.Tensor) -> torch.Tensor:
    """Low-latency rows [L, R*M, H] (first recv_count[l] valid) -> expert outputs [L, R*M, H] bf16."""
    data = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    L, RM, H = data.shape
    cap = RM * min(num_topk, L)  # every received token is on at most min(K, L) local experts
    ends = recv_count.to(torch.int64).cumsum(0)
    j = torch.arange(cap, device=data.device)
    expert = torch.searchsorted(ends, j, right=True)        # L for rows past the last valid one
    valid = expert < L
    e = expert.clamp(max=L - 1)
    i = torch.where(valid, j - (ends[e] - recv_count[e].to(torch.int64)), 0)
    if isinstance(recv_x, tuple):  # gather the FP8 rows as bytes (indexing needs no FP8 kernels)
        x = per_token_cast_back(recv_x[0].view(torch.uint8)[e, i], recv_x[1][e, i].contiguous())
    else:
        x = data[e, i]
    y = mlp(x, w13, w2, ends.to(torch.int32), None)
    # valid rows back to their slot; the others to a scratch tail (no duplicate indices)
    out = torch.empty(L * RM + cap, H, dtype=y.dtype, device=y.device)
    out.index_copy_(0, torch.where(valid, e * RM + i, L * RM + j), y)
    return out[:L * RM].view(L, RM, H)
