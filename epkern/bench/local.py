"""Single-process kernel families: the FP8 cast, the dispatch layout, the LPLB planner.

Each runner checks epkern's result against the torch definition first (a benchmark of wrong
results is worth nothing), then times it: on a GPU over CUDA-graph replays (device time, many
calls per graph) and over eager calls (host launch cost included), both with CUDA events; on CPU
with the host clock. The torch definition is timed beside it as the baseline.
"""
from __future__ import annotations

import torch

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

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)


def _inputs(ctx: Context, make, nbytes: int) -> list:
    return ctx.bench.rotating(make, nbytes) if ctx.gpu else [make()]


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


def run_moe(ctx: Context, model) -> None:
    try:
        import epkern.moe  # noqa: F401  (the MoE layer, when this version has it)
    except ImportError:
        ctx.skip("moe", "epkern.moe is not in this version of epkern")
        return
    ctx.skip("moe", "epkern bench has no MoE-layer runner yet")


RUNNERS = {"fp8": run_fp8, "layout": run_layout, "lplb": run_lplb, "moe": run_moe}


def units(plan) -> int:
    """Progress-bar steps of the local runners."""
    n = 0
    for w in plan.local_whats:
        for m in plan.models:
            n += {"fp8": 1, "layout": len(plan.ep_sizes), "lplb": len(lplb_ep_sizes(plan, m)), "moe": 0}[w] * \
                 (len(plan.tokens[w]) if w != "lplb" else 1)
    return n
