"""Dispatch layout: which ranks and experts each token goes to (the first kernel of the pipeline)."""
from __future__ import annotations

import dataclasses
import functools

import torch

from epkern.codegen import KernelSpec, check_int, get_module
from epkern.codegen.launch import current_stream_handle
from epkern.codegen.scratch import SelfResettingZeros

from . import errors
from .call_plans import fresh_output, store
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
    if not topk_idx.is_cuda or errors.check_level() == 2:  # CUDA: the kernel checks (epkern.errors)
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


class _Plan:
    """The launch of one call signature (shape, strides, device, E, R, check level): everything but the
    input pointer, the fresh outputs and the stream is fixed, so a call is three fresh outputs and one
    prepared cuLaunchKernel (codegen.launch.Launcher)."""

    __slots__ = ("spec", "device", "num_tokens", "num_ranks", "num_experts", "launch", "err", "err_any", "_ws",
                 "new_per_rank", "new_per_expert", "new_in_rank")

    def __init__(self, spec: LayoutSpec, device: torch.device, num_tokens: int, level: int):
        self.spec, self.device, self.num_tokens = spec, device, num_tokens
        self.num_ranks, self.num_experts = spec.num_ranks, spec.num_experts
        self.new_per_rank = fresh_output((self.num_ranks,), torch.int32, device)
        self.new_per_expert = fresh_output((self.num_experts,), torch.int32, device)
        self.new_in_rank = fresh_output((num_tokens, self.num_ranks), torch.bool, device)
        grid = max(1, min(MAX_BLOCKS, -(-num_tokens // spec.threads)))
        self.launch = get_module(spec, device.index).launcher("", grid, spec.threads, "pi" + "p" * 7)
        self.err = self.err_any = 0
        if level >= 1:
            self.err, self.err_any = errors.site(
                device.index, f"get_dispatch_layout: topk_idx ({spec.symbol}) outside [-1, {spec.num_experts})")
        self._ws: dict = {}

    def __call__(self, topk_idx: torch.Tensor):
        per_rank, per_expert, in_rank = self.new_per_rank(), self.new_per_expert(), self.new_in_rank()
        stream = _raw_stream(self.device.index)
        ws = self._ws.get(stream)
        if ws is None:
            ws = self._ws[stream] = _Workspace.get(self.spec, self.device, stream)
        ticket = ws._ticket
        if not ticket.trusted:
            ticket.get()
        self.launch(stream, topk_idx.data_ptr(), self.num_tokens, per_rank.data_ptr(), per_expert.data_ptr(),
                    in_rank.data_ptr(), ws.partials.data_ptr(), ticket.tensor.data_ptr(), self.err, self.err_any)
        return per_rank, per_expert, in_rank


_raw_stream = current_stream_handle
_plans: dict = {}
_PLAN_LIMIT = 1024  # distinct call signatures kept (a new token count is a new signature)


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
    Ids outside [-1, E) are dropped by the kernel and reported by the next check (epkern.errors:
    `epkern.check_errors()`, or the next checked call); EPKERN_CHECK_VALUES=2 checks before the launch.
    """
    try:  # a signature seen before: its checks passed, only the pointers and the stream are new
        plan = _plans.get((topk_idx.shape, topk_idx.stride(), topk_idx.dtype, topk_idx.get_device(), num_experts,
                           type(num_experts), num_ranks, type(num_ranks), errors.check_level()))
    except (AttributeError, TypeError):
        plan = None
    if plan is not None:
        errors.raise_pending()
        return plan(topk_idx)
    _check_layout_args(topk_idx, num_experts, num_ranks)
    if not topk_idx.is_cuda:
        return layout_reference(topk_idx.contiguous(), num_experts, num_ranks)
    errors.raise_pending()
    num_tokens, num_topk = topk_idx.shape
    level = errors.check_level()
    plan = _Plan(_spec(num_experts, num_ranks, num_topk), topk_idx.device, num_tokens, level)
    if level == 2:  # the eager host check runs on every call: nothing to cache
        return plan(topk_idx)
    store(_plans, (topk_idx.shape, topk_idx.stride(), topk_idx.dtype, topk_idx.get_device(), num_experts,
                   type(num_experts), num_ranks, type(num_ranks), level), plan, _PLAN_LIMIT)
    return plan(topk_idx)


def deployment_specs(deployment) -> list[LayoutSpec]:
    return [LayoutSpec(num_experts=deployment.num_experts, num_ranks=r, num_topk=deployment.num_topk)
            for r in deployment.ep_sizes]
