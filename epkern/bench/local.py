"""Single-process kernel families: the FP8 cast, the dispatch layout, the LPLB planner, the MoE layer.

Each runner checks epkern's result against the torch definition first (a benchmark of wrong
results is worth nothing), then times it: on a GPU over CUDA-graph replays (device time, many
calls per graph) and over eager calls (host launch cost included), both with CUDA events; on CPU
with the host clock. The torch definition is timed beside it as the baseline.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from .devices import dense_bf16_peak
from .report import make_row
from .timing import Bench

FP8_GROUP = 128
FP8_CALLS = 20       # calls per captured graph
LAYOUT_CALLS = 10
LPLB_CALLS = 10
LPLB_REDUNDANT = 2   # redundant experts per rank, the cube topology's


class Context:
    """What every runner shares: the plan, timing, the rows and skips collected so far."""

    def __init__(self, plan, impls: list[dict], progress=None):
        self.plan = plan
        self.impls = {i["name"]: i for i in impls}
        self.gpu = plan.device == "cuda"
        self.dev = torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")
        self.bench = Bench("epkern-bench", warmup=plan.warmup, repeats=plan.repeats)
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.progress = progress
        self._copy_bw = None

    def version(self, impl: str) -> str:
        return self.impls[impl]["version"]

    @property
    def copy_bw(self) -> float | None:
        """Measured device copy bandwidth (the byte floor's rate); None on CPU."""
        if self.gpu and self._copy_bw is None:
            self._copy_bw = self.bench.copy_bandwidth(1 << 28)
        return self._copy_bw

    def skip(self, what: str, reason: str, impl: str = "", failed: bool = False) -> None:
        """Record what did not run and why; failed=True for errors (the command then exits 1)."""
        self.skipped.append({"what": what, "impl": impl, "reason": reason, "failed": failed})

    def times(self, what: str, fn, inputs: list, calls: int, graph: bool = True, repeats: int | None = None):
        """[(mode, timing)]: graph replays and eager calls on a GPU, the host clock on CPU."""
        if not self.gpu:
            return [("host", self.bench.time_host(fn, inputs, repeats=repeats))]
        out = []
        if graph:
            try:
                out.append(("graph", self.bench.time(fn, inputs, graph=True, calls_per_graph=calls, repeats=repeats)))
            except Exception as exc:  # a call that cannot be captured still has its eager time
                self.skip(what, f"graph capture failed ({type(exc).__name__}: {str(exc)[:100]})")
        out.append(("eager", self.bench.time(fn, inputs, repeats=repeats)))
        return out

    def pair_times(self, first, second, repeats: int | None = None, between=None):
        """(mode, first's timing, second's timing) of two calls that must alternate: eager calls
        with CUDA events on a GPU, the host clock on CPU; between() after each pair, untimed."""
        if not self.gpu:
            return ("host", *self.bench.time_pair_host(first, second, repeats, between))
        return ("eager", *self.bench.time_pair(first, second, repeats, between))

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)


def _inputs(ctx: Context, make, nbytes: int) -> list:
    return ctx.bench.rotating(make, nbytes) if ctx.gpu else [make()]


@contextlib.contextmanager
def unchecked_values():
    """EPKERN_CHECK_VALUES=0 unless the caller set it: timed calls without id checks (which DeepEP
    does not make either), and nothing that syncs the host inside a CUDA-graph capture."""
    saved = os.environ.get("EPKERN_CHECK_VALUES")
    os.environ.setdefault("EPKERN_CHECK_VALUES", "0")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("EPKERN_CHECK_VALUES", None)


# -- FP8 per-token cast -------------------------------------------------------------------------------
def run_fp8(ctx: Context, model) -> None:
    from epkern.fp8 import per_token_cast_to_fp8, quantize_reference

    H = model.hidden
    if H % FP8_GROUP:
        ctx.skip("fp8", f"hidden {H} is not a multiple of the group size {FP8_GROUP}")
        return
    for T in ctx.plan.tokens["fp8"]:
        nbytes = T * H * 2 + T * H + T * (H // FP8_GROUP) * 4   # bf16 in, e4m3 + fp32 scales out
        inputs = _inputs(ctx, lambda: torch.randn(T, H, dtype=torch.bfloat16, device=ctx.dev), nbytes)
        shape = dict(tokens=T, hidden=H)
        reference = lambda x: quantize_reference(x, FP8_GROUP, False)  # noqa: E731
        if ctx.gpu:
            q, s = per_token_cast_to_fp8(inputs[0], FP8_GROUP)
            want_q, want_s = reference(inputs[0])
            check = "ok" if torch.equal(q.view(torch.uint8), want_q) and torch.equal(s, want_s) else "MISMATCH"
            for mode, t in ctx.times("fp8", lambda x: per_token_cast_to_fp8(x, FP8_GROUP), inputs, FP8_CALLS):
                ctx.add(make_row("fp8", "cast", "epkern", ctx.version("epkern"), mode, t, bytes_moved=nbytes,
                                 floor_bw=ctx.copy_bw, check=check, **shape))
        for mode, t in ctx.times("fp8", reference, inputs, 1, graph=False, repeats=min(ctx.plan.repeats, 20)):
            ctx.add(make_row("fp8", "cast", "torch", torch.__version__, mode, t, bytes_moved=nbytes,
                             floor_bw=ctx.copy_bw, check="reference", **shape))
        ctx.tick()


# -- dispatch layout --------------------------------------------------------------------------------
def _routing(T: int, E: int, K: int, device) -> torch.Tensor:
    """Distinct top-k experts per token from random scores, as DeepEP's tests draw them."""
    return torch.rand(T, E, device=device).topk(K, dim=1).indices.to(torch.int64).contiguous()


def run_layout(ctx: Context, model) -> None:
    from epkern.layout import get_dispatch_layout, layout_reference

    E, K = model.experts, model.topk
    for R in ctx.plan.ep_sizes:
        for T in ctx.plan.tokens["layout"]:
            nbytes = T * K * 8 + T * R + (E + R) * 4   # read topk_idx, write the mask and both counts
            inputs = _inputs(ctx, lambda: _routing(T, E, K, ctx.dev), nbytes)
            shape = dict(tokens=T, hidden=model.hidden, experts=E, topk=K, ranks=R)
            want = layout_reference(inputs[0], E, R)
            if ctx.gpu:
                from epkern.codegen import knobs

                note = "eager calls check ids (EPKERN_CHECK_VALUES=1: one host sync)" if knobs.check_values() else ""
                got = get_dispatch_layout(inputs[0], E, R)
                check = "ok" if all(torch.equal(g, w) for g, w in zip(got, want)) else "MISMATCH"
                for mode, t in ctx.times("layout", lambda x: get_dispatch_layout(x, E, R), inputs, LAYOUT_CALLS):
                    ctx.add(make_row("layout", "layout", "epkern", ctx.version("epkern"), mode, t, bytes_moved=nbytes,
                                     floor_bw=ctx.copy_bw, check=check, note=note if mode == "eager" else "", **shape))
            for mode, t in ctx.times("layout", lambda x: layout_reference(x, E, R), inputs, 1, graph=False):
                ctx.add(make_row("layout", "layout", "torch", torch.__version__, mode, t, bytes_moved=nbytes,
                                 floor_bw=ctx.copy_bw, check="reference", **shape))
            ctx.tick()


# -- LPLB planner -----------------------------------------------------------------------------------
def lplb_ep_sizes(plan, model) -> list[int]:
    """The cube topology joins ranks in groups of 8: EP sizes that are multiples of 8 (else EP 8)."""
    sizes = [r for r in plan.ep_sizes if r % 8 == 0] or [8]
    return [r for r in sizes if model.experts % r == 0]


def _planner(model, ep: int, device):
    from epkern.solver import Planner, cube_8p2e

    planner = Planner(cube_8p2e().to(device), model.experts + LPLB_REDUNDANT * ep, model.experts, ep)
    gen = torch.Generator().manual_seed(ep)
    history = ((torch.randn(model.experts, generator=gen) * 0.15 + 1).clamp_min(0) * 2**20).long()
    planner.update_redundancy_mapping(history.to(device), gpus_per_node=8)
    return planner


def run_lplb(ctx: Context, model) -> None:
    sizes = lplb_ep_sizes(ctx.plan, model)
    if not sizes:
        ctx.skip("lplb", f"{model.experts} experts do not split over EP 8 (the cube topology's groups)")
        return
    version = ctx.version("epkern")
    for ep in sizes:
        planner = _planner(model, ep, ctx.dev)
        counter = torch.zeros(1, dtype=torch.int32, device=ctx.dev)
        gen = torch.Generator().manual_seed(ep + 1)
        loads = [((torch.randn(model.experts, generator=gen) * 0.3 + 1).clamp_min(0) * 2**12).int().to(ctx.dev)
                 for _ in range(8 if ctx.gpu else 2)]
        planner.solve_probs(loads[0], counter)
        check = "ok" if bool((planner.last_status == 0).all()) else "not optimal"
        shape = dict(hidden=model.hidden, experts=model.experts, topk=model.topk, ranks=ep)
        for mode, t in ctx.times("lplb", lambda w: planner.solve_probs(w, counter), loads, LPLB_CALLS):
            ctx.add(make_row("lplb", "solve", "epkern", version, mode, t, check=check, **shape))
        n_sms = torch.cuda.get_device_properties(ctx.dev).multi_processor_count if ctx.gpu else 1
        n_phy = model.experts + LPLB_REDUNDANT * ep
        for T in ctx.plan.tokens["lplb"]:
            idx = [torch.randint(-1, model.experts, (T, model.topk), device=ctx.dev)
                   for _ in range(4 if ctx.gpu else 1)]
            out = planner.run(idx[0], counter, n_sms)
            ok = bool(((out >= -1) & (out < n_phy)).all()) and bool(((out == -1) == (idx[0] == -1)).all())
            for mode, t in ctx.times("lplb", lambda x: planner.run(x, counter, n_sms), idx, LPLB_CALLS):
                ctx.add(make_row("lplb", "run", "epkern", version, mode, t, check="ok" if ok else "BAD IDS",
                                 tokens=T, note="count + solve + map", **shape))
        ctx.tick()


# -- the MoE layer ------------------------------------------------------------------------------------
MOE_DECODE_MAX_TOKENS = 128   # decode (low-latency) rows up to this many tokens per rank: decode batches
MOE_CALLS = 2                 # decode calls per captured graph
MOE_SCRATCH = 4 << 30         # bytes for activations and communication buffers beside the weights


def moe_flops(tokens: int, topk: int, hidden: int, intermediate: int) -> int:
    """Expert matmul FLOPs: per (token, expert) pair, gate and up (2 x H x 2I) and down (2 x I x H)."""
    return 6 * tokens * topk * hidden * intermediate


def moe_floor(row: dict, flops: int, peak: float | None) -> dict:
    """Adds flops, tflops and the floor that binds: the FLOPs at the dense BF16 peak when slower than
    the byte floor (the weights read at the copy bandwidth) already in the row."""
    median = row["median_us"]
    row.update(flops=flops, tflops=flops / (median * 1e-6) / 1e12)
    flop_us = flops / peak * 1e6 if peak else None
    if flop_us and flop_us > (row.get("floor_us") or 0):
        row.update(floor_us=flop_us, fraction_of_floor=flop_us / median, floor_bound="flops at the BF16 peak")
    elif row.get("floor_us"):
        row["floor_bound"] = "bytes at the copy bandwidth"
    return row


def moe_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """What the single-process layer must return for x: a loop over its experts with torch.matmul on its
    own weights (no dispatch, no grouped GEMM), the dispatch's FP8 rounding applied to the input."""
    from epkern.fp8 import per_token_cast_back, per_token_cast_to_fp8

    idx, w = layer.route(x)
    xq = per_token_cast_back(*per_token_cast_to_fp8(x)) if layer.use_fp8 else x
    inter = layer.intermediate
    out = torch.zeros(x.shape[0], layer.hidden, dtype=torch.float32, device=x.device)
    for e in torch.unique(idx).tolist():
        token, k = (idx == e).nonzero(as_tuple=True)
        slot = layer.local_experts.index(e)
        h = xq[token] @ layer.w13[slot].t()
        act = (F.silu(h[:, :inter].float()) * h[:, inter:].float() * w[token, k].unsqueeze(1)).to(x.dtype)
        out.index_add_(0, token, (act @ layer.w2[slot].t()).float())
    return out.to(x.dtype)


def moe_close(got: torch.Tensor, want: torch.Tensor, scale: float = 1.0) -> bool:
    """A few bf16 roundings apart (tests/test_moe_cpu.py's bound; decode rounds partial sums once more)."""
    err = (got.float() - want.float()).abs()
    bound = scale * 2 ** -6 * (want.float().abs() + want.float().abs().mean())
    return bool((err <= bound).all())


@contextlib.contextmanager
def group_of_one():
    """A process group of this process alone (an in-process store, gloo) for the duration."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def moe_buffer(group, model, max_tokens: int, decode_tokens: int):
    """epkern.Buffer for the layer: the NVLink backend, its low-latency half when decode rows run."""
    import epkern

    nvl = epkern.Config().get_nvl_buffer_size_hint(model.hidden * 2, 1, max_tokens, model.topk)
    ll = epkern.get_low_latency_rdma_size_hint(decode_tokens, model.hidden, 1, model.experts) if decode_tokens else 0
    return epkern.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=ll, low_latency_mode=bool(decode_tokens),
                         backend="nvlink", timeout_s=60.0)


def moe_skip_reason(ctx: Context, model) -> str | None:
    """Why the layer cannot run for this shape here (None when it can)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return "torch.distributed is already initialized in this process (the runner makes a group of one)"
    weights = 3 * model.experts * model.hidden * ctx.plan.moe_intermediate * 2
    if ctx.dev.type == "cuda":
        free = torch.cuda.mem_get_info(ctx.dev)[0]
        if 2 * weights + MOE_SCRATCH > free:
            return (f"the experts' weights ({weights / 2**30:.1f} GiB, twice that while they are made) do not fit in "
                    f"the {free / 2**30:.1f} GiB free: fewer --experts or a smaller --intermediate")
    return None


def run_moe(ctx: Context, model) -> None:
    """epkern.moe.MoE (routing, FP8 cast, layout + dispatch, grouped-GEMM experts, combine) on one GPU:
    EP 1 in this process (a group of one, so dispatch and combine are the NVLink kernels' local
    copies), one micro-batch, no shared expert. Prefill (normal mode) is eager (its dispatch syncs
    the host for the counts); decode (low-latency, up to MOE_DECODE_MAX_TOKENS tokens) also over
    graph replays. Checked against moe_reference; the floor is the larger of the expert matmuls at
    the dense BF16 peak and the weights of the experts in use read at the copy bandwidth."""
    from epkern.moe import MoE

    why = moe_skip_reason(ctx, model)
    if why:
        ctx.skip("moe", why)
        return
    H, E, K, I = model.hidden, model.experts, model.topk, ctx.plan.moe_intermediate
    tokens = ctx.plan.tokens["moe"]
    use_fp8 = H % 128 == 0
    decode = [T for T in tokens if T <= MOE_DECODE_MAX_TOKENS]
    if decode and not use_fp8:
        ctx.skip("moe", f"decode: hidden {H} is not a multiple of 128 (the low-latency kernels' FP8 groups)")
        decode = []
    peak = dense_bf16_peak(torch.cuda.get_device_name(ctx.dev)) if ctx.dev.type == "cuda" else None
    version = ctx.version("epkern")
    note = f"EP1, one process: dispatch/combine are local copies; {'fp8' if use_fp8 else 'bf16'} dispatch, I={I}"
    with group_of_one() as group, unchecked_values():
        buffer = moe_buffer(group, model, max(tokens), max(decode, default=0))
        try:
            layer = MoE(H, I, E, K, buffer=buffer, mode="prefill", overlap=False, num_microbatches=1,
                        use_fp8=use_fp8, num_max_dispatch_tokens_per_rank=max(decode, default=1), device=ctx.dev)
            if decode and layer.decode_path != "low_latency":
                ctx.skip("moe", "decode: the Buffer has no low-latency half here")
            for T in tokens:
                gen = torch.Generator(device=ctx.dev).manual_seed(T)
                x = torch.randn(T, H, generator=gen, device=ctx.dev).to(torch.bfloat16)
                want = moe_reference(layer, x)
                in_use = int(torch.unique(layer.route(x)[0]).numel())
                nbytes = in_use * 3 * H * I * 2 + 2 * T * H * 2   # the experts' weights, x in and y out
                ops = [("prefill", False)]
                if T in decode and layer.decode_path == "low_latency":
                    ops.append(("decode", True))
                for op, graph in ops:
                    layer.mode = op
                    check = "ok" if moe_close(layer(x), want, scale=2.0 if op == "decode" else 1.0) else "MISMATCH"
                    for mode, t in ctx.times("moe", lambda v: layer(v), [x], MOE_CALLS, graph=graph):
                        row = make_row("moe", op, "epkern", version, mode, t, bytes_moved=nbytes, floor_bw=ctx.copy_bw,
                                       check=check, note=note, tokens=T, hidden=H, experts=E, topk=K, ranks=1,
                                       intermediate=I)
                        ctx.add(moe_floor(row, moe_flops(T, K, H, I), peak))
                ctx.tick()
        finally:
            buffer.destroy()


RUNNERS = {"fp8": run_fp8, "layout": run_layout, "lplb": run_lplb, "moe": run_moe}


def units(plan) -> int:
    """Progress-bar steps of the local runners."""
    n = 0
    for w in plan.local_whats:
        for m in plan.models:
            n += {"fp8": 1, "layout": len(plan.ep_sizes), "lplb": len(lplb_ep_sizes(plan, m)), "moe": 1}[w] * \
                 (len(plan.tokens[w]) if w != "lplb" else 1)
    return n
