"""Dispatch layout: which ranks and experts each token goes to (the first kernel of the pipeline)."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from epkern.codegen import KernelSpec, check_int, get_module
from epkern.codegen.launch import current_stream_handle
from epkern.codegen.scratch import SelfResettingZeros

from .validate import check_positive_int, check_range, check_tensor

MAX_RANKS = 64
MAX_BLOCKS = 132  # one wave on H100/H200; partial counts are [MAX_BLOCKS, E + R]


@dataclasses.dataclass(frozen=True)
class LayoutSpec(KernelSpec):
    family = "layout"
    template = "layout.cu.j2"

    num_experts: int
    num_ranks: int
    num_topk: int
    threads: int = 256

    def validate(self) -> None:
        n = type(self).__name__
        check_int(n, "num_ranks", self.num_ranks, 1, MAX_RANKS)
        check_int(n, "num_experts", self.num_experts, 1, 1 << 16, multiple_of=self.num_ranks)
        check_int(n, "num_topk", self.num_topk, 1, 64)
        check_int(n, "threads", self.threads, 32, 1024, multiple_of=32)

    def template_vars(self):
        return dict(num_experts=self.num_experts, num_ranks=self.num_ranks, num_topk=self.num_topk,
                    threads=self.threads)

    def name_fields(self) -> str:
        return f"e{self.num_experts}_r{self.num_ranks}_k{self.num_topk}"


@functools.lru_cache(maxsize=256)
def _spec(num_experts: int, num_ranks: int, num_topk: int) -> LayoutSpec:
    """One spec object per call signature, so its validation runs once per shape, not per call."""
    return LayoutSpec(num_experts=num_experts, num_ranks=num_ranks, num_topk=num_topk)


MAX_LAYOUT_EXPERTS = 1 << 16  # LayoutSpec's bound, for the CPU path too


def _check_layout_args(topk_idx, num_experts: int, num_ranks: int) -> None:
    check_positive_int("num_ranks", num_ranks)
    check_positive_int("num_experts", num_experts)
    if num_ranks > MAX_RANKS:
        raise ValueError(f"num_ranks={num_ranks}: at most {MAX_RANKS} ranks are supported")
    if num_experts > MAX_LAYOUT_EXPERTS:  # the CPU path allocates per expert: fail before terabytes
        raise ValueError(f"num_experts={num_experts}: at most {MAX_LAYOUT_EXPERTS} experts are supported")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} must be divisible by num_ranks={num_ranks}")
    check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2)
    if topk_idx.shape[1] < 1:
        raise ValueError(f"topk_idx: needs at least one column, got shape {tuple(topk_idx.shape)}")
    check_range("topk_idx", topk_idx, -1, num_experts)


def layout_reference(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """Vectorized torch definition (any device): the CPU path and the oracle for the kernel."""
    num_tokens = topk_idx.shape[0]
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
    rank = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, num_ranks))
    in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    in_rank.scatter_(1, rank, True)
    in_rank = in_rank[:, :num_ranks].contiguous()
    per_rank = in_rank.sum(0, dtype=torch.int32)
    return per_rank, per_expert, in_rank


class _Workspace:
    """Per (spec, device, stream) scratch: partial counts and the last-block ticket, which the
    kernel leaves at zero (see epkern.codegen.scratch for how a ticket made in a capture is zeroed)."""

    _cache: dict = {}

    def __init__(self, spec: LayoutSpec, device: torch.device):
        self.partials = torch.empty(MAX_BLOCKS * (spec.num_experts + spec.num_ranks), dtype=torch.int32, device=device)
        self._ticket = SelfResettingZeros(1, device)

    @property
    def ticket(self) -> torch.Tensor:
        return self._ticket.tensor

    @property
    def trusted(self) -> bool:
        return self._ticket.trusted

    @classmethod
    def get(cls, spec: LayoutSpec, device: torch.device, stream_handle: int) -> "_Workspace":
        key = (spec, device.index, stream_handle)
        ws = cls._cache.get(key)
        if ws is None:
            ws = cls._cache[key] = cls(spec, device)
        ws._ticket.get()
        return ws


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """Count tokens per rank and per expert and mark which ranks each token must reach.

    Args:
        topk_idx: [num_tokens, num_topk] int64; -1 means "no expert".
        num_experts: global expert count E (divisible by num_ranks); experts are split contiguously.
        num_ranks: EP size R (at most 64).

    Returns:
        num_tokens_per_rank [R] int32 (a token counts once per rank it reaches),
        num_tokens_per_expert [E] int32 (every top-k occurrence counts),
        is_token_in_rank [T, R] bool.
    CUDA tensors run the JIT kernel on the current stream; CPU tensors use the torch definition.
    """
    _check_layout_args(topk_idx, num_experts, num_ranks)
    if not topk_idx.is_cuda:
        return layout_reference(topk_idx.contiguous(), num_experts, num_ranks)
    num_tokens, num_topk = topk_idx.shape
    spec = _spec(num_experts, num_ranks, num_topk)
    device = topk_idx.device
    per_rank = torch.empty(num_ranks, dtype=torch.int32, device=device)
    per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
    in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device)
    stream = current_stream_handle(device.index)
    ws = _Workspace.get(spec, device, stream)
    grid = max(1, min(MAX_BLOCKS, -(-num_tokens // spec.threads)))
    module = get_module(spec, device.index)
    module.launch("", grid, spec.threads, topk_idx, np.int32(num_tokens), per_rank, per_expert, in_rank,
                  ws.partials, ws.ticket, stream=stream)
    return per_rank, per_expert, in_rank


def deployment_specs(deployment) -> list[LayoutSpec]:
    return [LayoutSpec(num_experts=deployment.num_experts, num_ranks=r, num_topk=deployment.num_topk)
            for r in deployment.ep_sizes]
