"""A reference MoE layer over epkern.Buffer, written as stages for the overlap scheduler.

    layer = MoE(hidden, intermediate, num_experts, num_topk, buffer=buffer, mode="prefill",
                num_microbatches=2, overlap=True, shared_intermediate=..., planner=None)
    y = layer(x)                       # x [T, H] bf16 on this rank -> y [T, H] bf16

The batch is split into `num_microbatches` micro-batches along the tokens; each runs as a
generator of stages (epkern.hooks), overlapped (round-robin) or one after the other:

* prefill (normal mode): route -> FP8 cast -> layout + dispatch on the communication stream
  (async_finish, previous_event, allocate_on_comm_stream) | shared expert on the compute stream
  -> yield the dispatch's EventOverlap -> experts (grouped GEMM) -> combine with the shared
  expert's output as its bias -> yield the combine's EventOverlap.
* decode (low-latency): route -> low_latency_dispatch(use_fp8, return_recv_hook) | shared expert
  -> yield the receive hook -> experts -> low_latency_combine(return_recv_hook) -> yield its hook
  -> add the shared expert. One stream, no host sync: the whole step captures into a CUDA graph
  (without a planner that all-reduces over a non-NCCL group). The Buffer alternates two
  low-latency buffers, so at most 2 micro-batches. NVLink sends are stores made by the send
  kernel's SMs, so on one stream they do not overlap with computation (only the wait for the
  peers does); decode_send_stream=True issues each send on a side stream, beside the other
  micro-batch's computation, and the receive waits for it (still one graph: fork/join by events).
  Where the Buffer has no low-latency half (CPU:
  low-latency mode needs CUDA peer memory) decode runs the prefill stages on the normal-mode
  backend (the torch backend under gloo): `layer.decode_path` says which.
* buffer=None: every expert local, no communication: the single-process reference.

Weights are drawn per logical expert from `seed` on the layer's device, so every rank (and the
reference) holds identical copies without communication; with a Planner each physical slot,
redundant copies included, holds the weights of its logical expert (planner.phy2log).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from epkern import hooks
from epkern.buffer import _tensors
from epkern.fp8 import per_token_cast_back, per_token_cast_to_fp8
from epkern.validate import check_positive_int, check_tensor

from .experts import dense_mlp, experts_low_latency, experts_normal
from .routing import check_routing, route

MODES = ("prefill", "decode")


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


class MoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, num_topk: int, *, buffer=None,
                 mode: str = "prefill", overlap: bool = True, num_microbatches: int = 2,
                 score_func: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, correction_bias: bool = False, norm_topk_prob: bool = True,
                 shared_intermediate: int = 0, planner=None, use_fp8: bool = True,
                 num_max_dispatch_tokens_per_rank: int = 128, decode_send_stream: bool = False, seed: int = 0,
                 device=None):
        super().__init__()
        for name, v in (("hidden", hidden), ("intermediate", intermediate),
                        ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)):
            check_positive_int(name, v)
        check_positive_int("shared_intermediate", shared_intermediate, lo=0)
        check_routing(num_experts, num_topk, score_func, n_group, topk_group)
        if use_fp8 and hidden % 128:
            raise ValueError(f"hidden={hidden}: FP8 dispatch needs a multiple of 128 (or use_fp8=False)")
        self.hidden, self.intermediate, self.num_experts, self.num_topk = hidden, intermediate, num_experts, num_topk
        self.routing = dict(score_func=score_func, n_group=n_group, topk_group=topk_group,
                            routed_scaling_factor=float(routed_scaling_factor), norm_topk_prob=norm_topk_prob)
        self.buffer, self.planner, self.use_fp8 = buffer, planner, use_fp8
        self.mode, self.overlap, self.num_microbatches = mode, overlap, num_microbatches
        self.max_tokens = num_max_dispatch_tokens_per_rank
        self.decode_send_stream, self._send_stream = decode_send_stream, None
        self.rank, self.ep_size = (buffer.rank, buffer.group_size) if buffer is not None else (0, 1)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._check_planner()
        self.num_physical = planner.n_routed_experts if planner is not None else num_experts
        if self.num_physical % self.ep_size:
            raise ValueError(f"num_experts={self.num_physical} must be a multiple of the {self.ep_size} EP ranks")
        self.num_local = self.num_physical // self.ep_size
        lo = self.rank * self.num_local
        slots = torch.arange(lo, lo + self.num_local)
        self.local_experts = (planner.phy2log.cpu()[slots].long() if planner is not None else slots).tolist()
        self._init_weights(seed, correction_bias, shared_intermediate)
        ll = getattr(buffer, "low_latency_mode", False) and getattr(buffer, "_low_latency", None) is not None
        self.decode_path = "low_latency" if ll else "normal"
        # the weights-carried dispatch (issue 17 item 2), used where the Buffer has it
        self._ll_weights = ll and (_accepts(buffer.low_latency_dispatch, "topk_weights")
                                   or _accepts(getattr(buffer._low_latency, "low_latency_dispatch", None),
                                               "topk_weights"))
        self._avail = torch.zeros(1, dtype=torch.int32, device=self.device)

    def _check_planner(self) -> None:
        p = self.planner
        if p is None:
            return
        if self.buffer is None:
            raise ValueError("planner: needs a buffer (the single-process layer has no redundant experts)")
        if p.n_logical_routed_experts != self.num_experts or p.ep_size != self.ep_size:
            raise ValueError(f"planner: made for {p.n_logical_routed_experts} logical experts over {p.ep_size} ranks, "
                             f"the layer has {self.num_experts} experts over {self.ep_size} ranks")

    # -- weights ---------------------------------------------------------------------------------------
    def _randn(self, seed: int, *shape, scale: float) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(*shape, generator=g, device=self.device) * scale

    def _init_weights(self, seed: int, correction_bias: bool, shared: int) -> None:
        H, I, E = self.hidden, self.intermediate, self.num_experts
        base = 1_000_003 * (seed + 1)
        self.gate_weight = nn.Parameter(self._randn(base, E, H, scale=H ** -0.5), requires_grad=False)
        bias = self._randn(base + 1, E, scale=0.05) if correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)
        # expert e's weights depend on (seed, e) only: identical on every rank holding a copy
        bf16 = torch.bfloat16
        w13 = [self._randn(base + 16 + 2 * e, 2 * I, H, scale=H ** -0.5).to(bf16) for e in self.local_experts]
        w2 = [self._randn(base + 17 + 2 * e, H, I, scale=I ** -0.5).to(bf16) for e in self.local_experts]
        self.w13 = nn.Parameter(torch.stack(w13), requires_grad=False)   # [L, 2I, H], gate rows first
        self.w2 = nn.Parameter(torch.stack(w2), requires_grad=False)     # [L, H, I]
        self.shared_w13 = self.shared_w2 = None
        if shared:
            self.shared_w13 = nn.Parameter(self._randn(base + 2, 2 * shared, H, scale=H ** -0.5).to(torch.bfloat16),
                                           requires_grad=False)
            self.shared_w2 = nn.Parameter(self._randn(base + 3, H, shared, scale=shared ** -0.5).to(torch.bfloat16),
                                          requires_grad=False)

    # -- pieces ------------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor):
        """(topk_idx, topk_weights): logical ids, rewritten to physical ones by the planner if any."""
        idx, w = route(x, self.gate_weight, self.num_topk, e_score_correction_bias=self.e_score_correction_bias,
                       **self.routing)
        if self.planner is not None:
            idx = self.planner.run(idx, self._avail)
        return idx, w

    def shared_expert(self, x: torch.Tensor):
        return dense_mlp(x, self.shared_w13, self.shared_w2) if self.shared_w13 is not None else None

    def experts_normal(self, recv_x, recv_topk_idx, recv_topk_weights, counts):
        return experts_normal(recv_x, recv_topk_idx, recv_topk_weights, counts, self.w13, self.w2)

    def experts_low_latency(self, recv_x, recv_count):
        return experts_low_latency(recv_x, recv_count, self.num_topk, self.w13, self.w2)

    # -- stages ------------------------------------------------------------------------------------------
    def _stage_local(self, x):
        idx, w = self.route(x)
        xq = per_token_cast_back(*per_token_cast_to_fp8(x)) if self.use_fp8 else x  # what dispatch would carry
        counts = torch.bincount(idx.reshape(-1), minlength=self.num_local).tolist()
        y = self.experts_normal(xq, idx, w, counts)
        shared = self.shared_expert(x)
        return y if shared is None else (y.float() + shared.float()).to(y.dtype)
        yield  # noqa: unreachable: makes this a generator with no pending receive

    def _stage_normal(self, x):
        buf = self.buffer
        idx, w = self.route(x)
        send = per_token_cast_to_fp8(x) if self.use_fp8 else x
        ready = buf.capture()  # routing and the cast, on the compute stream
        per_rank, _, per_expert, in_rank, event = buf.get_dispatch_layout(
            idx, self.num_physical, previous_event=ready, async_finish=True, allocate_on_comm_stream=True)
        recv, recv_idx, recv_w, counts, handle, event = buf.dispatch(
            send, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx, topk_weights=w, previous_event=event, async_finish=True, allocate_on_comm_stream=True)
        shared = self.shared_expert(x)  # compute stream, while the dispatch is in flight
        yield hooks.Pending(event, "dispatch")
        y = self.experts_normal(recv, recv_idx, recv_w, counts)
        out, _, event = buf.combine(y, handle, bias=shared, previous_event=buf.capture(), async_finish=True,
                                    allocate_on_comm_stream=True)
        yield hooks.Pending(event, "combine")
        return out

    def _send(self, fn, inputs: tuple):
        """fn() -> (..., hook) issued on the compute stream, or with decode_send_stream on the send
        stream (after the compute stream's work so far, running beside the other micro-batch's
        computation); returns fn's result with the hook wrapped so the receive, on the compute
        stream, first waits for the send."""
        if not self.decode_send_stream:
            *result, hook = fn()
            return result, hooks.once(hook)
        compute = torch.cuda.current_stream()
        if self._send_stream is None:
            self._send_stream = torch.cuda.Stream(device=self.device)
        side = self._send_stream
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            *result, hook = fn()
        sent = torch.cuda.Event()
        sent.record(side)
        for t in _tensors(inputs):      # made on the compute stream, read on the send stream
            t.record_stream(side)
        for t in _tensors(result):      # made on the send stream, used on the compute stream
            t.record_stream(compute)

        def receive():
            torch.cuda.current_stream().wait_event(sent)
            hook()

        return result, hooks.once(receive)

    def _stage_low_latency(self, x):
        buf = self.buffer
        idx, w = self.route(x)
        extra = {"topk_weights": w} if self._ll_weights else {}
        (recv, count, handle, _), receive = self._send(lambda: buf.low_latency_dispatch(
            x, idx, self.max_tokens, self.num_physical, use_fp8=self.use_fp8, return_recv_hook=True, **extra),
            (x, idx, w))
        shared = self.shared_expert(x)  # while the tokens are in flight
        yield hooks.Pending(receive, "dispatch")
        y = self.experts_low_latency(recv, count)
        (out, _), receive = self._send(lambda: buf.low_latency_combine(y, idx, w, handle, return_recv_hook=True),
                                       (y,))
        yield hooks.Pending(receive, "combine")
        return out if shared is None else out + shared

    # -- forward -----------------------------------------------------------------------------------------
    def stages(self, x: torch.Tensor) -> list:
        """One stage generator per micro-batch of x (for callers that schedule several layers)."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: allowed values are {list(MODES)}")
        check_positive_int("num_microbatches", self.num_microbatches)
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2, shape=(None, self.hidden), device=self.device)
        chunks = x.tensor_split(self.num_microbatches) if self.num_microbatches > 1 else (x,)
        if self.buffer is None:
            stage = self._stage_local
        elif self.mode == "decode" and self.decode_path == "low_latency":
            if self.num_microbatches > 2:
                raise ValueError(f"num_microbatches={self.num_microbatches}: low-latency mode alternates two "
                                 "buffers, so at most 2 micro-batches can be in flight")
            if chunks[0].shape[0] > self.max_tokens:
                raise ValueError(f"x: {chunks[0].shape[0]} tokens per micro-batch exceed "
                                 f"num_max_dispatch_tokens_per_rank={self.max_tokens}")
            stage = self._stage_low_latency
        else:
            stage = self._stage_normal
        return [stage(c) for c in chunks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = hooks.run(self.stages(x), overlap=self.overlap)
        return torch.cat(outs) if len(outs) > 1 else outs[0]
