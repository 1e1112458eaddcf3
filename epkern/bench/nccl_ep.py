"""NCCL EP (`pip install nccl-extensions`, module nccl.ep) beside epkern, inside each launched rank.

Its communicator is a fresh NCCL one made from the bench's process group
(nccl.ep.interop.torch.get_nccl_comm_from_group, over nccl4py), made once per launch; each shape
gets an nccl.ep.Group on it:

  normal mode   Algorithm.HIGH_THROUGHPUT, Layout.FLAT, receive buffers of (max tokens x ranks) rows
                (a fixed budget: no count read-back inside NCCL EP). Dispatch is the routing update
                (NCCL EP's count exchange, which DeepEP's and epkern's dispatch also make) and the
                dispatch, then the host reads the received count (as epkern's normal dispatch does);
                combine sums each rank's rows (unweighted, as DeepEP's).
  low latency   Algorithm.LOW_LATENCY, Layout.EXPERT_MAJOR: [local experts, ranks x M, hidden] blocks;
                FP8 dispatch by its DS_FP8E3M4 recipe (E4M3 rows, a scale per 128; hidden a multiple of
                512, else bf16); combine applies the weights on the receive side. The routing is bound
                to the handle once per token count, as DeepEP binds it per call.

NCCL EP's calls come in pairs (a combine belongs to the dispatch before it), so each iteration
runs dispatch then combine, each between its own CUDA events, then a device sync and a barrier
outside the timings, as its own ep_bench does (it says ranks must stay in step for HT): eager,
host launch cost included (never hidden behind a previous call). The checks, bytes and floors
are comm.py's. NCCL refuses two ranks on one GPU, so it runs only with one GPU per rank;
world size 1 is allowed by its API (nccl_ep.cc asserts only nRanks > 0).
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from . import comm
from .devices import nvlink_floor_bw
from .report import make_row

IMPL = "nccl-ep"
MAX_HT_TOKENS = 8192        # MAX_SUPPORTED_TOKENS_PER_RANK, nccl_ep/include/common.hpp (HT kernels)
MAX_HIDDEN = 16384          # MAX_HIDDEN_DIM, the same file
MAX_RANKS = 8               # its release notes: up to 8 ranks per node (the bench runs one node)
FP8_MULTIPLE = 512          # DS_FP8E3M4 needs hidden divisible by 512
TIMEOUT_NS = 60 * 10**9     # its GPU-side waits give up after 60 s (a peer that never arrives), as our buffers do


class SetupError(RuntimeError):
    """NCCL EP could not be started here (communicator, group or handle): recorded as a skip."""


def why_not(ctx, job) -> str | None:
    """Why NCCL EP cannot run in this launch, or None."""
    entry = ctx.impls[IMPL]
    if not entry["importable"]:
        return entry["reason"]
    if not ctx.gpu:
        return "needs CUDA GPUs"
    if job.backend != "nccl":
        return (f"NCCL refuses two ranks on one GPU: NCCL EP needs one GPU per rank "
                f"({job.world} ranks share {job.num_gpus} GPU{'s' if job.num_gpus != 1 else ''} here)")
    if job.world > MAX_RANKS:
        return f"NCCL EP runs at most {MAX_RANKS} ranks on one node"
    return None


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0


def _in_step() -> None:
    """Between timed pairs: this rank's work done, then every rank's."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()


class Session:
    """nccl.ep and the launch's NCCL communicator, made on first use (collectively, on every rank)."""

    def __init__(self, group):
        self.group = group
        self.ep = None
        self.comm = None

    def start(self):
        if self.comm is None:
            try:
                self.ep = importlib.import_module("nccl.ep")
                interop = importlib.import_module("nccl.ep.interop.torch")
                self.comm = interop.get_nccl_comm_from_group(self.group)
            except Exception as exc:
                raise SetupError(f"no NCCL communicator ({type(exc).__name__}: {str(exc)[:200]})") from exc
        return self

    def make_group(self, algorithm, experts: int, max_tokens: int, hidden: int, **extra):
        ep = self.start().ep
        config = ep.GroupConfig(algorithm=algorithm, num_experts=experts, max_dispatch_tokens_per_rank=max_tokens,
                                max_token_bytes=hidden * 2, timeout_ns=TIMEOUT_NS, **extra)
        try:
            return ep.Group.create(self.comm, config)
        except Exception as exc:
            raise SetupError(f"no {algorithm.name} group ({type(exc).__name__}: {str(exc)[:200]})") from exc

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None


class _Descriptors:
    """nccl.ep.Tensor descriptors and bundles made once per set of tensors (the timed loop reuses them)."""

    def __init__(self, ep):
        self.ep = ep
        self._made: dict = {}

    def get(self, tensors, make):
        key = tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors)
        if key not in self._made:
            self._made[key] = make(*[self.ep.Tensor(t) for t in tensors])
        return self._made[key]

    def clear(self) -> None:
        """Forget them (each descriptor holds its tensor: a token count's inputs stay alive until then)."""
        self._made.clear()


class _Mode:
    """What both modes share: the combine's output per token count (made once, reused by the next
    combine of that count) and tearing the handle and group down."""

    def _combine_output(self, T: int) -> torch.Tensor:
        out = self._combined.get(T)
        if out is None:
            out = self._combined[T] = torch.empty(T, self.model.hidden, dtype=torch.bfloat16, device=self.device)
        return out

    def destroy(self) -> None:
        if self.handle is not None:
            self.handle.destroy()
            self.handle = None
        self.group.destroy()


class HighThroughput(_Mode):
    """NCCL EP's normal mode for one model shape, up to max_tokens tokens per rank."""

    def __init__(self, session: Session, model, ranks: int, max_tokens: int, device):
        ep = self.ep = session.start().ep
        self.model, self.device = model, device
        self.capacity = max_tokens * ranks   # FLAT: each token reaches a rank at most once
        self.group = session.make_group(ep.Algorithm.HIGH_THROUGHPUT, model.experts, max_tokens, model.hidden,
                                        max_recv_tokens_per_rank=self.capacity)
        H, K = model.hidden, model.topk
        self.recv = torch.empty(self.capacity, H, dtype=torch.bfloat16, device=device)
        self.recv_weights = torch.empty(self.capacity, K, dtype=torch.float32, device=device)
        self.recv_idx = torch.empty(self.capacity, K, dtype=torch.int64, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)
        self.desc = _Descriptors(ep)
        self.outputs = self.desc.get((self.recv, self.recv_weights, self.recv_idx),
                                     lambda t, w, i: ep.DispatchOutputs(tokens=t, topk_weights=w, topk_idx=i))
        self.layout = self.desc.get((self.count,), lambda c: ep.LayoutInfo(recv_total_counter=c))
        self.handle, self._tokens, self._staging = None, None, None
        self._combined: dict = {}

    def route(self, topk_idx: torch.Tensor) -> None:
        """Bind the routing: a new handle for a new token count, else the per-step update."""
        idx = self.ep.Tensor(topk_idx)
        self._routing = (idx, topk_idx)   # alive while the handle may read it
        if self.handle is not None and self._tokens == topk_idx.shape[0]:
            self.handle.update(idx, layout_info=self.layout, stream=_stream())
            return
        if self.handle is not None:
            self.handle.destroy()
            self.handle = None
        try:
            self.handle = self.group.create_handle(self.ep.Layout.FLAT, idx, layout_info=self.layout, stream=_stream())
        except Exception as exc:
            raise SetupError(f"no FLAT handle ({type(exc).__name__}: {str(exc)[:200]})") from exc
        self._tokens = topk_idx.shape[0]

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Routing update + dispatch; the received rows (a view of the receive buffer) once the host
        has read their count."""
        self.route(topk_idx)
        inputs = self.desc.get((x, topk_weights), lambda t, w: self.ep.DispatchInputs(tokens=t, topk_weights=w))
        self.handle.dispatch(inputs, self.outputs, stream=_stream())
        return self.recv[:int(self.count.item())]

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum each rank's `rows` (the received ones, or expert outputs of their shape) back to its tokens;
        the result is reused by the next combine of the same token count."""
        source = self.recv
        if rows.data_ptr() != self.recv.data_ptr():   # expert outputs: into a block of the dispatch output's shape
            if self._staging is None:
                self._staging = torch.empty_like(self.recv)
            source = self._staging
            source[:rows.shape[0]].copy_(rows)
        T = self._tokens
        out = self._combine_output(T)
        inputs = self.desc.get((source,), lambda t: self.ep.CombineInputs(tokens=t))
        outputs = self.desc.get((out,), lambda t: self.ep.CombineOutputs(tokens=t))
        self.handle.combine(inputs, outputs, stream=_stream())
        return out



class LowLatency(_Mode):
    """NCCL EP's low-latency mode for one model shape and M (max tokens per rank and call)."""

    def __init__(self, session: Session, model, ranks: int, max_tokens: int, device):
        ep = self.ep = session.start().ep
        self.model, self.device, self.M = model, device, max_tokens
        self.group = session.make_group(ep.Algorithm.LOW_LATENCY, model.experts, max_tokens, model.hidden)
        H, L = model.hidden, model.experts // ranks
        self.fp8 = H % FP8_MULTIPLE == 0
        self.recv_bf16 = torch.empty(L, ranks * max_tokens, H, dtype=torch.bfloat16, device=device)
        self.recv_fp8 = None
        if self.fp8:
            self.recv_fp8 = (torch.empty(L, ranks * max_tokens, H, dtype=torch.float8_e4m3fn, device=device),
                             torch.empty(L, ranks * max_tokens, H // 128, dtype=torch.float32, device=device))
        self.counts = torch.zeros(L, dtype=torch.int32, device=device)
        self.desc = _Descriptors(ep)
        self.layout = self.desc.get((self.counts,), lambda c: ep.LayoutInfo(expert_counters=c))
        self.handle, self._bound = None, None
        self._combined: dict = {}

    def route(self, topk_idx: torch.Tensor) -> None:
        """Bind the routing to a handle when it is not the one bound (outside any timed loop)."""
        key = (topk_idx.data_ptr(), tuple(topk_idx.shape))
        if key == self._bound:
            return
        if self.handle is not None:
            self.handle.destroy()
            self.handle = None
        idx = self.ep.Tensor(topk_idx)
        self._routing = (idx, topk_idx)   # alive while the handle may read it
        try:
            self.handle = self.group.create_handle(self.ep.Layout.EXPERT_MAJOR, idx, stream=_stream())
        except Exception as exc:
            raise SetupError(f"no EXPERT_MAJOR handle ({type(exc).__name__}: {str(exc)[:200]})") from exc
        self._bound = key

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, use_fp8: bool):
        """-> (received rows: bf16 [L, R*M, H], or (E4M3 rows, fp32 scales [L, R*M, H/128]); counts [L])."""
        self.route(topk_idx)
        ep = self.ep
        inputs = self.desc.get((x,), lambda t: ep.DispatchInputs(tokens=t))
        if use_fp8:
            rows, scales = self.recv_fp8
            outputs = self.desc.get((rows, scales), lambda t, s: ep.DispatchOutputs(tokens=t, scales=s))
            config = ep.DispatchConfig(quantization_recipe=ep.DispatchQuantizationRecipe.DS_FP8E3M4)
            received = self.recv_fp8
        else:
            outputs = self.desc.get((self.recv_bf16,), lambda t: ep.DispatchOutputs(tokens=t))
            config, received = None, self.recv_bf16
        self.handle.dispatch(inputs, outputs, layout_info=self.layout, config=config, stream=_stream())
        return received, self.counts

    def combine(self, expert_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Expert outputs [L, R*M, H] bf16 -> [T, H], weighted on the receive side; the result is reused
        by the next combine of the same token count."""
        T = topk_weights.shape[0]
        out = self._combine_output(T)
        inputs = self.desc.get((expert_out,), lambda t: self.ep.CombineInputs(tokens=t))
        outputs = self.desc.get((out, topk_weights), lambda t, w: self.ep.CombineOutputs(tokens=t, topk_weights=w))
        self.handle.combine(inputs, outputs, stream=_stream())
        return out



# -- the runners ------------------------------------------------------------------------------------
def run_normal(ctx, job, session: Session, model, whats) -> None:
    """Dispatch (routing update + dispatch + the count's read-back) and combine, per token count."""
    rank, R = dist.get_rank(), job.world
    tokens = [T for T in ctx.plan.tokens[whats[0]] if T <= MAX_HT_TOKENS]
    if len(tokens) < len(ctx.plan.tokens[whats[0]]):
        ctx.skip(",".join(whats), f"more than {MAX_HT_TOKENS} tokens per rank (its HT kernels' limit)", IMPL)
    if not tokens:
        return
    version, floor_bw = ctx.version(IMPL), nvlink_floor_bw(job.device_name, job.shared)
    ht = HighThroughput(session, model, R, max(tokens), ctx.dev)
    try:
        for T in tokens:
            x, topk_idx, weights = comm.rank_inputs(rank, T, model, ctx.dev)
            in_rank = comm.on_rank(topk_idx, model.experts, R)
            rows = ht.dispatch(x, topk_idx, weights)
            check = comm.normal_round_trip(x, in_rank, ht.combine(rows), job)
            n = rows.shape[0]
            remote = n - int(in_rank[:, rank].sum())
            dist.barrier()
            mode, *timings = ctx.pair_times(lambda: ht.dispatch(x, topk_idx, weights), lambda: ht.combine(ht.recv[:n]),
                                            between=_in_step)
            notes = {"dispatch": "bf16, routing update + dispatch + count read-back", "combine": "bf16"}
            for op, t in zip(("dispatch", "combine"), timings):
                if op in whats:
                    ctx.add(comm.normal_row(op, IMPL, version, mode, t, model, R, T, n, remote, floor_bw, check,
                                            note=notes[op]))
            ht.desc.clear()
            ctx.tick()
    finally:
        ht.destroy()


def run_low_latency(ctx, job, session: Session, model) -> None:
    """Dispatch (FP8 where its recipe allows) and bf16 combine, per token count (M = the largest)."""
    rank, R = dist.get_rank(), job.world
    tokens = ctx.plan.tokens["low_latency"]
    M, H, E = max(tokens), model.hidden, model.experts
    version, floor_bw = ctx.version(IMPL), nvlink_floor_bw(job.device_name, job.shared)
    ll = LowLatency(session, model, R, M, ctx.dev)
    if not ll.fp8:
        ctx.skip("low_latency", f"FP8 dispatch: hidden {H} is not a multiple of {FP8_MULTIPLE} (its DS_FP8E3M4 "
                                "recipe); its dispatch rows are bf16", IMPL)
    dtype = "fp8" if ll.fp8 else "bf16"
    try:
        for T in tokens:
            x, topk_idx, weights = comm.rank_inputs(rank, T, model, ctx.dev)
            received, _ = ll.dispatch(x, topk_idx, use_fp8=False)
            check = comm.low_latency_round_trip(x, weights, ll.combine(received, weights), job)
            expert_out = (torch.randn(E // R, R * M, H, device=ctx.dev) * 0.1).to(torch.bfloat16)
            nbytes = comm.low_latency_bytes(comm.remote_messages(topk_idx, E, R, rank), H, fp8_dispatch=ll.fp8)
            dist.barrier()
            mode, *timings = ctx.pair_times(lambda: ll.dispatch(x, topk_idx, use_fp8=ll.fp8),
                                            lambda: ll.combine(expert_out, weights), between=_in_step)
            shape = dict(tokens=T, hidden=H, experts=E, topk=model.topk, ranks=R)
            for op, t, kind in zip(("dispatch", "combine"), timings, (dtype, "bf16")):
                ctx.add(make_row("low_latency", op, IMPL, version, mode, t, bytes_moved=nbytes[op],
                                 floor_bw=floor_bw, check=check, note=f"{kind}, M={M}", **shape))
            ll.desc.clear()
            ctx.tick()
    finally:
        ll.destroy()


def cases(ctx, job, normal_whats: tuple, low_latency: bool) -> tuple[list, Session | None]:
    """([(progress steps, implementation, case)], the session to close) for this launch; the reason
    it cannot run is recorded as a skip instead."""
    whats = normal_whats + (("low_latency",) if low_latency else ())
    if not whats or job.only_epkern:
        return [], None
    why = why_not(ctx, job)
    if why:
        ctx.skip(",".join(whats), why, IMPL)
        return [], None
    plan, session = ctx.plan, Session(dist.group.WORLD)
    out = []
    if normal_whats:
        steps = len([T for T in plan.tokens[normal_whats[0]] if T <= MAX_HT_TOKENS])
        for m in plan.models:
            if m.hidden > MAX_HIDDEN:
                ctx.skip(",".join(normal_whats), f"hidden {m.hidden} exceeds its {MAX_HIDDEN}", IMPL)
                continue
            out.append((steps, IMPL, lambda m=m: run_normal(ctx, job, session, m, normal_whats)))
    if low_latency:
        for m in plan.models:
            if m.hidden > MAX_HIDDEN or m.hidden % 128:
                ctx.skip("low_latency", f"hidden {m.hidden}: low-latency rows need a multiple of 128 up to "
                                        f"{MAX_HIDDEN}", IMPL)
                continue
            out.append((len(plan.tokens["low_latency"]), IMPL, lambda m=m: run_low_latency(ctx, job, session, m)))
    return out, session
