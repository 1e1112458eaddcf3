"""Multi-rank kernel families, run inside each launched rank: dispatch / combine and low latency.

Every implementation is checked first with a round trip every rank agrees on (combine of the
dispatched rows without weights gives each token times the number of ranks it reached;
low-latency combine with weights gives each token times the sum of its weights), then timed
with every rank in step (a barrier before each timing loop, the same number of calls on every
rank). Normal mode is timed over eager calls (dispatch syncs the host for the received counts,
so it cannot be captured); low-latency mode over CUDA-graph replays and eager calls.
Bytes: normal mode counts the rows a rank receives (DeepEP's convention); low-latency mode the
(token, other rank) messages it sends. The floor is the bytes that cross NVLink (rows from or to
other ranks) at devices.NVLINK_ONE_WAY, on GPUs of the H100/H200 family with one GPU per rank only.
NCCL EP (nccl_ep.py) makes the same checks and rows with the helpers here; its cases run last.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .devices import nvlink_floor_bw
from .local import Context
from .report import make_row

LL_CALLS = 10            # calls per captured graph (even: the two alternating buffers end where they began)


def rank_inputs(rank: int, T: int, model, device):
    """(x [T, H] bf16, topk_idx [T, K] int64, weights [T, K] fp32) of this rank, the same for every
    implementation."""
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    x = (torch.randn(T, model.hidden, generator=gen, device=device) * 0.1).to(torch.bfloat16)
    scores = torch.rand(T, model.experts, generator=gen, device=device)
    topk_idx = scores.topk(model.topk, dim=1).indices.to(torch.int64).contiguous()
    weights = torch.rand(T, model.topk, generator=gen, device=device)
    return x, topk_idx, weights


def on_rank(topk_idx: torch.Tensor, experts: int, ranks: int) -> torch.Tensor:
    """[T, R] bool: which ranks hold one of each token's experts."""
    on = torch.zeros(topk_idx.shape[0], ranks, dtype=torch.bool, device=topk_idx.device)
    on.scatter_(1, (topk_idx // (experts // ranks)).clamp(min=0), topk_idx >= 0)
    return on


def agree(ok: bool, job) -> str:
    """'ok' when the check passed on every rank, else 'MISMATCH'."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32,
                        device="cuda" if job.backend == "nccl" else "cpu")
    dist.all_reduce(flag)
    return "ok" if int(flag.item()) == 0 else "MISMATCH"


def normal_round_trip(x: torch.Tensor, in_rank: torch.Tensor, combined: torch.Tensor, job) -> str:
    """Combine of the dispatched rows, unweighted: each token times the number of ranks it reached."""
    want = x.float() * in_rank.sum(1, keepdim=True).float()
    return agree(bool(((combined.float() - want).abs() <= 0.02 * want.abs() + 1e-2).all()), job)


def low_latency_round_trip(x: torch.Tensor, weights: torch.Tensor, combined: torch.Tensor, job) -> str:
    """Low-latency combine of the dispatched (bf16) rows with weights: each token times its weights' sum."""
    want = x.float() * weights.sum(1, keepdim=True)
    return agree(bool(((combined.float() - want).abs() <= 0.03 * want.abs().amax() + 1e-3).all()), job)


def normal_row(op: str, impl: str, version: str, mode: str, timing: dict, model, ranks: int, tokens: int,
               rows: int, remote: int, floor_bw, check: str, num_sms=None, note: str | None = None) -> dict:
    """A normal-mode row: bytes are the `rows` received, the floor the `remote` ones over NVLink."""
    shape = dict(tokens=tokens, hidden=model.hidden, experts=model.experts, topk=model.topk, ranks=ranks,
                 num_sms=num_sms)
    if note is None:
        note = "bf16, layout given" if op == "dispatch" else "bf16"
    row = make_row(op, op, impl, version, mode, timing, bytes_moved=rows * model.hidden * 2, check=check, note=note,
                   **shape)
    if floor_bw and remote:
        floor_us = remote * model.hidden * 2 / floor_bw * 1e6
        row.update(floor_us=floor_us, fraction_of_floor=floor_us / timing["median_us"])
    return row


def low_latency_bytes(messages: int, hidden: int, fp8_dispatch: bool = True) -> dict:
    """Bytes of `messages` (token, other rank) messages: FP8 rows with their scales (or bf16 rows) for
    dispatch, bf16 rows for combine."""
    row = hidden + hidden // 128 * 4 if fp8_dispatch else hidden * 2
    return {"dispatch": messages * row, "combine": messages * hidden * 2}


def remote_messages(topk_idx: torch.Tensor, experts: int, ranks: int, rank: int) -> int:
    """(token, rank) pairs of this rank's tokens whose rank is another one."""
    on = on_rank(topk_idx, experts, ranks)
    return int(on.sum()) - int(on[:, rank].sum())


class _Impl:
    """A normal-mode implementation: how to build its buffer and its Config for an SM count."""

    def __init__(self, name: str, make_buffer, make_config, sweeps_sms: bool):
        self.name, self.make_buffer, self.make_config, self.sweeps_sms = name, make_buffer, make_config, sweeps_sms


def normal_impls(ctx: Context, job, whats) -> list[_Impl]:
    """The normal-mode implementations this launch can run (the others are recorded as skipped)."""
    import epkern
    from epkern.normal import kernels as ik

    group, R, out = dist.group.WORLD, job.world, []
    skip = lambda impl, why: ctx.skip(",".join(whats), why, impl)  # noqa: E731
    if not ctx.gpu:
        skip("epkern", "the NVLink kernels need CUDA GPUs")
    elif R > ik.MAX_RANKS:
        skip("epkern", f"the NVLink backend runs at most {ik.MAX_RANKS} ranks (one node)")
    else:
        def nvlink_buffer(max_tokens, model):
            nbytes = epkern.Config().get_nvl_buffer_size_hint(model.hidden * 2, R, max_tokens, model.topk)
            return epkern.Buffer(group, num_nvl_bytes=nbytes, backend="nvlink", timeout_s=60.0)
        out.append(_Impl("epkern", nvlink_buffer, lambda sms: None if sms is None else epkern.Config(sms), True))
    if ctx.gpu and job.backend != "nccl":
        skip("epkern-torch", "ranks share GPUs over gloo: the torch backend's CUDA all-to-all needs NCCL")
    elif job.only_epkern:
        pass
    else:
        out.append(_Impl("epkern-torch", lambda max_tokens, model: epkern.Buffer(group, backend="torch"),
                         lambda sms: None, False))
    if job.only_epkern:
        return out
    from .impls import deepep_module

    deep_ep, why = deepep_module()
    if deep_ep is None:
        skip("deepep", why)
    elif not ctx.gpu or job.backend != "nccl":
        skip("deepep", "DeepEP needs one GPU per rank (NCCL)")
    else:
        out.append(_Impl("deepep", lambda max_tokens, model: deep_ep.Buffer(group, int(1e9)),
                         lambda sms: None if sms is None else deep_ep.Config(sms, 6, 256, 6, 128), True))
    return out


def run_normal(ctx: Context, job, impl: _Impl, model, whats) -> None:
    """Dispatch (bf16, layout given, host sync included) and combine, per token count and SM count."""
    rank, R = dist.get_rank(), job.world
    tokens = ctx.plan.tokens[whats[0]]
    buf = impl.make_buffer(max(tokens), model)
    version = ctx.version(impl.name)
    floor_bw = nvlink_floor_bw(job.device_name, job.shared)
    try:
        for T in tokens:
            x, topk_idx, weights = rank_inputs(rank, T, model, ctx.dev)
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, model.experts)
            layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                          topk_idx=topk_idx, topk_weights=weights)
            for sms in (ctx.plan.num_sms or (None,)) if impl.sweeps_sms else (None,):
                cfg = impl.make_config(sms)
                kw = {} if cfg is None else {"config": cfg}
                recv_x, _, _, _, handle, _ = buf.dispatch(x, **layout, **kw)
                combined, _, _ = buf.combine(recv_x, handle, **kw)
                check = normal_round_trip(x, in_rank, combined, job)
                rows = recv_x.shape[0]
                remote = rows - int(in_rank[:, rank].sum())   # rows from other ranks
                cases = [("dispatch", lambda _: buf.dispatch(x, **layout, **kw), type(buf).get_dispatch_config),
                         ("combine", lambda _: buf.combine(recv_x, handle, **kw), type(buf).get_combine_config)]
                for op, fn, default_config in cases:
                    if op not in whats:
                        continue
                    used = sms   # the SMs the call used: the default (or tuned) config's when not given
                    if used is None and impl.sweeps_sms:
                        used = getattr(default_config(R), "num_sms", None)
                    dist.barrier()
                    for mode, t in ctx.times(op, fn, [None], 1, graph=False):
                        ctx.add(normal_row(op, impl.name, version, mode, t, model, R, T, rows, remote, floor_bw, check,
                                           num_sms=used))
                ctx.tick()
    finally:
        destroy = getattr(buf, "destroy", None)
        if destroy is not None and impl.name != "deepep":
            destroy()


def ll_impls(ctx: Context, job) -> list[tuple]:
    from epkern.low_latency import LowLatencyBuffer, get_low_latency_rdma_size_hint
    from epkern.low_latency.kernels import MAX_RANKS

    group, R, out = dist.group.WORLD, job.world, []
    if R > MAX_RANKS:
        ctx.skip("low_latency", f"at most {MAX_RANKS} ranks", "epkern")
    else:
        def ours(M, model, sms):
            kw = {} if sms is None else {"num_sms": sms}
            return LowLatencyBuffer(group, get_low_latency_rdma_size_hint(M, model.hidden, R, model.experts),
                                    timeout_s=60.0, **kw)
        out.append(("epkern", ours))
    if job.only_epkern:
        return out
    from .impls import deepep_module

    deep_ep, why = deepep_module()
    if deep_ep is None:
        ctx.skip("low_latency", why, "deepep")
    elif job.backend != "nccl":
        ctx.skip("low_latency", "DeepEP needs one GPU per rank (NCCL)", "deepep")
    else:
        def theirs(M, model, sms):
            nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, model.hidden, R, model.experts)
            return deep_ep.Buffer(group, 0, nbytes, low_latency_mode=True, num_qps_per_rank=model.experts // R)
        out.append(("deepep", theirs))
    return out


def run_low_latency(ctx: Context, job, name: str, make, model) -> None:
    """FP8 dispatch and bf16 combine, per token count (M = the largest), graph replays and eager calls."""
    rank, R = dist.get_rank(), job.world
    tokens = ctx.plan.tokens["low_latency"]
    M, H, E = max(tokens), model.hidden, model.experts
    floor_bw = nvlink_floor_bw(job.device_name, job.shared)
    version = ctx.version(name)
    for sms in (ctx.plan.num_sms or (None,)) if name == "epkern" else (None,):
        buf = make(M, model, sms)
        try:
            for T in tokens:
                x, topk_idx, weights = rank_inputs(rank, T, model, ctx.dev)
                recv, _, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
                combined, _, _ = buf.low_latency_combine(recv, topk_idx, weights, handle)
                check = low_latency_round_trip(x, weights, combined, job)
                _, _, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True)
                expert_out = (torch.randn(E // R, R * M, H, device=ctx.dev) * 0.1).to(torch.bfloat16)
                nbytes = low_latency_bytes(remote_messages(topk_idx, E, R, rank), H)
                used = buf.num_sms if name == "epkern" else None   # ours caps it at the GPU's SM count
                shape = dict(tokens=T, hidden=H, experts=E, topk=model.topk, ranks=R, num_sms=used)
                cases = [("dispatch", lambda _: buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True), "fp8"),
                         ("combine", lambda _: buf.low_latency_combine(expert_out, topk_idx, weights, handle), "bf16")]
                for op, fn, dtype in cases:
                    dist.barrier()
                    for mode, t in ctx.times("low_latency", fn, [None], LL_CALLS):
                        ctx.add(make_row("low_latency", op, name, version, mode, t, bytes_moved=nbytes[op],
                                         floor_bw=floor_bw, check=check, note=f"{dtype}, M={M}", **shape))
                ctx.tick()
        finally:
            destroy = getattr(buf, "destroy", None)
            if destroy is not None and name == "epkern":
                destroy()


def run_comm(ctx: Context, job, progress=None, flush=None) -> None:
    """Every multi-rank case of the plan, in the same order on every rank; progress(total=n) makes
    the progress bar, flush() (if given) saves the rows so far after each case. NCCL EP's cases run
    last: a crash inside it loses no other implementation's rows."""
    from . import nccl_ep

    plan = ctx.plan
    normal = tuple(w for w in ("dispatch", "combine") if w in plan.whats)
    cases = []
    if normal:
        for impl in normal_impls(ctx, job, normal):
            steps = len(plan.tokens[normal[0]]) * (len(plan.num_sms or (None,)) if impl.sweeps_sms else 1)
            cases += [(steps, impl.name, lambda impl=impl, m=m: run_normal(ctx, job, impl, m, normal))
                      for m in plan.models]
    low_latency = "low_latency" in plan.whats
    if low_latency:
        if not ctx.gpu:
            ctx.skip("low_latency", "needs CUDA GPUs (NVLink peer memory)")
            low_latency = False
        else:
            for name, make in ll_impls(ctx, job):
                steps = len(plan.tokens["low_latency"]) * (len(plan.num_sms or (None,)) if name == "epkern" else 1)
                models = [m for m in plan.models if m.hidden % 128 == 0]
                if len(models) < len(plan.models):
                    ctx.skip("low_latency", "hidden sizes that are not a multiple of 128 (FP8 groups)", name)
                cases += [(steps, name, lambda name=name, make=make, m=m: run_low_latency(ctx, job, name, make, m))
                          for m in models]
    theirs, session = nccl_ep.cases(ctx, job, normal, low_latency)
    cases += theirs
    if progress is not None:
        ctx.progress = progress(total=sum(steps for steps, _, _ in cases))
    try:
        for _, impl, case in cases:
            try:
                case()
            except nccl_ep.SetupError as exc:  # NCCL EP could not start here: why, not a failure of ours
                ctx.skip(",".join(plan.comm_whats), f"could not start: {exc}", nccl_ep.IMPL)
            except Exception as exc:  # recorded; the next implementation still runs
                why = f"failed on rank {dist.get_rank()}: {type(exc).__name__}: {str(exc)[:200]}"
                ctx.skip(",".join(plan.comm_whats), why, impl, failed=True)
            if flush is not None:
                flush()
    finally:
        if session is not None:
            session.close()
    if ctx.progress is not None:
        ctx.progress.close()
