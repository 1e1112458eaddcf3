"""The router: softmax or sigmoid top-k, optionally DeepSeek-V3's group-limited routing.

    scores  = softmax(x @ W^T) or sigmoid(x @ W^T)              (fp32)
    choice  = scores + e_score_correction_bias                   (the bias only picks experts)
    n_group > 1: keep the topk_group groups of experts with the best group score (the sum of the
                 group's top-2 choices with a correction bias, as DeepSeek-V3 does, else its max)
    topk_idx  = top-k of choice; topk_weights = scores at topk_idx,
                normalized to sum 1 if norm_topk_prob, times routed_scaling_factor.
"""
from __future__ import annotations

import torch

SCORE_FUNCS = ("softmax", "sigmoid")


def check_routing(num_experts: int, num_topk: int, score_func: str, n_group: int, topk_group: int) -> None:
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func={score_func!r}: allowed values are {list(SCORE_FUNCS)}")
    for name, v in (("num_experts", num_experts), ("num_topk", num_topk), ("n_group", n_group),
                    ("topk_group", topk_group)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: expected an int >= 1")
    if num_topk > num_experts:
        raise ValueError(f"num_topk={num_topk} exceeds num_experts={num_experts}")
    if num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide num_experts={num_experts}")
    if topk_group > n_group:
        raise ValueError(f"topk_group={topk_group} exceeds n_group={n_group}")
    if n_group > 1 and num_topk > topk_group * (num_experts // n_group):
        raise ValueError(f"num_topk={num_topk}: the {topk_group} kept groups hold only "
                         f"{topk_group * (num_experts // n_group)} experts")


def route(x: torch.Tensor, gate_weight: torch.Tensor, num_topk: int, *, score_func: str = "softmax",
          n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0,
          e_score_correction_bias: torch.Tensor | None = None, norm_topk_prob: bool = True):
    """x [T, H], gate_weight [E, H] -> (topk_idx [T, K] int64, topk_weights [T, K] fp32). No host sync."""
    logits = x.float() @ gate_weight.float().t()
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        if e_score_correction_bias is not None and E // n_group >= 2:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    topk_idx = choice.topk(num_topk, dim=-1).indices
    weights = scores.gather(1, topk_idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, (weights * routed_scaling_factor).contiguous()
