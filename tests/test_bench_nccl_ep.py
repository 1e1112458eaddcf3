"""`epkern bench`'s NCCL EP runner on CPU: without nccl.ep (the summary says why), and with a stand-in
nccl.ep that does what NCCL EP's API documents for one rank (FLAT and EXPERT_MAJOR layouts, the
DS_FP8E3M4 recipe, receive-side weights), which drives the runner's real logic: buffer shapes,
the received count, the FP8 choice, the checks and rows, and where it refuses to run."""
import enum
import sys
import types

import pytest
import torch
import torch.distributed as dist

from epkern.bench import comm, impls, nccl_ep
from epkern.bench.local import Context, group_of_one
from epkern.bench.ranks import Job
from epkern.bench.sweep import Model, build_plan


class _Bundle:
    """The inputs / outputs / config / layout-info dataclasses: named fields, None by default."""

    fields: tuple = ()

    def __init__(self, **kw):
        unknown = set(kw) - set(self.fields)
        assert not unknown, f"{type(self).__name__}: no fields {unknown}"
        for f in self.fields:
            setattr(self, f, kw.get(f))


def _fake_nccl_ep(wrong_combine: bool = False, group_error: str | None = None):
    """A one-rank nccl.ep: each token's rows stay home."""
    ep = types.ModuleType("nccl.ep")
    ep.Algorithm = enum.IntEnum("Algorithm", {"LOW_LATENCY": 0, "HIGH_THROUGHPUT": 1})
    ep.Layout = enum.IntEnum("Layout", {"UNSET": 0, "EXPERT_MAJOR": 1, "RANK_MAJOR": 2, "FLAT": 3})
    ep.DispatchQuantizationRecipe = enum.IntEnum("Recipe", {"NONE": 0, "FWD": 1, "DS_FP8E3M4": 2})
    for name, fields in (("DispatchInputs", ("tokens", "topk_weights", "scales")),
                         ("DispatchOutputs", ("tokens", "topk_weights", "scales", "topk_idx")),
                         ("CombineInputs", ("tokens", "topk_weights", "scales")),
                         ("CombineOutputs", ("tokens", "topk_weights")),
                         ("LayoutInfo", ("expert_counters", "src_rank_counters", "expert_offsets",
                                         "recv_total_counter")),
                         ("DispatchConfig", ("send_only", "round_scales", "quantization_recipe"))):
        setattr(ep, name, type(name, (_Bundle,), {"fields": fields}))
    ep.groups = []

    class Tensor:
        def __init__(self, t):
            assert isinstance(t, torch.Tensor)
            self.t = t

    class GroupConfig:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Handle:
        def __init__(self, group, layout):
            self.group, self.layout, self.destroyed = group, layout, False

        def update(self, topk_idx, *, layout_info=None, stream):
            self.idx = topk_idx.t
            if self.layout == ep.Layout.FLAT:
                layout_info.recv_total_counter.t[0] = int((self.idx >= 0).any(1).sum())

        def dispatch(self, inputs, outputs, *, layout_info=None, config=None, stream):
            x, cfg = inputs.tokens.t, self.group.config
            assert x.shape[0] <= cfg.max_dispatch_tokens_per_rank
            if self.layout == ep.Layout.FLAT:
                assert inputs.topk_weights is not None and layout_info is None
                assert outputs.tokens.t.shape[0] == cfg.max_recv_tokens_per_rank
                rows = (self.idx >= 0).any(1).nonzero().flatten()
                outputs.tokens.t[:len(rows)] = x[rows]
                outputs.topk_weights.t[:len(rows)] = inputs.topk_weights.t[rows]
                outputs.topk_idx.t[:len(rows)] = self.idx[rows]
                return
            from epkern.fp8 import per_token_cast_to_fp8

            fp8 = config is not None and config.quantization_recipe == ep.DispatchQuantizationRecipe.DS_FP8E3M4
            assert fp8 == (outputs.scales is not None)
            assert outputs.tokens.t.shape[1] == cfg.max_dispatch_tokens_per_rank
            self.slots = []
            for e in range(outputs.tokens.t.shape[0]):
                tok = (self.idx == e).any(1).nonzero().flatten()
                layout_info.expert_counters.t[e] = len(tok)
                if fp8:
                    q, s = per_token_cast_to_fp8(x[tok])
                    outputs.tokens.t[e, :len(tok)] = q
                    outputs.scales.t[e, :len(tok)] = s
                else:
                    outputs.tokens.t[e, :len(tok)] = x[tok]
                self.slots.append(tok)

        def combine(self, inputs, outputs, *, config=None, stream):
            rows, out = inputs.tokens.t, outputs.tokens.t
            if self.layout == ep.Layout.FLAT:
                assert rows.shape[0] == self.group.config.max_recv_tokens_per_rank
                home = (self.idx >= 0).any(1).nonzero().flatten()
                out.zero_()
                out[home] = rows[:len(home)]
            else:
                acc = torch.zeros(out.shape, dtype=torch.float32)
                for e, tok in enumerate(self.slots):
                    w = (outputs.topk_weights.t[tok] * (self.idx[tok] == e)).sum(1, keepdim=True)
                    acc[tok] += w * rows[e, :len(tok)].float()
                out.copy_(acc)
            if wrong_combine:
                out.mul_(2)

        def destroy(self):
            self.destroyed = True

    class Group:
        def __init__(self, config):
            self.config, self.handles, self.destroyed = config, [], False

        @classmethod
        def create(cls, comm_, config):
            if group_error:
                raise RuntimeError(group_error)
            assert comm_.nranks == 1 and config.max_token_bytes >= 2 * 8
            group = cls(config)
            ep.groups.append(group)
            return group

        def create_handle(self, layout, topk_idx, *, layout_info=None, config=None, stream):
            handle = Handle(self, layout)
            handle.update(topk_idx, layout_info=layout_info, stream=stream)
            self.handles.append(handle)
            return handle

        def destroy(self):
            self.destroyed = True

    class Comm:
        def __init__(self, nranks):
            self.nranks, self.destroyed = nranks, False

        def destroy(self):
            self.destroyed = True

    ep.Tensor, ep.GroupConfig, ep.Group = Tensor, GroupConfig, Group
    ep.get_lib_version = lambda: "0.2.0"
    interop = types.ModuleType("nccl.ep.interop.torch")
    ep.comms = []

    def get_nccl_comm_from_group(group):
        c = Comm(dist.get_world_size(group))
        ep.comms.append(c)
        return c

    interop.get_nccl_comm_from_group = get_nccl_comm_from_group
    return ep, interop


@pytest.fixture
def fake_ep(monkeypatch):
    def install(**kw):
        ep, interop = _fake_nccl_ep(**kw)
        monkeypatch.setitem(sys.modules, "nccl", types.ModuleType("nccl"))
        monkeypatch.setitem(sys.modules, "nccl.ep", ep)
        monkeypatch.setitem(sys.modules, "nccl.ep.interop", types.ModuleType("nccl.ep.interop"))
        monkeypatch.setitem(sys.modules, "nccl.ep.interop.torch", interop)
        monkeypatch.setattr(impls, "_dist_version", lambda *names: "0.1.0" if "nccl-extensions" in names else None)
        return ep
    return install


def _setup(tmp_path, whats, hidden, world=1, backend="gloo", num_gpus=1, shared=False):
    """The plan, job and context of a launch; the runs here are gloo groups on CPU (NCCL EP's own
    communicator is the stand-in's)."""
    plan = build_plan(whats, (8, 24), (hidden,), (max(8, world),), (2,), None, (world,), None, tmp_path, "cpu", 0, 0, 2)
    found = impls.discover()
    job = Job(plan, found, world, 0, backend, num_gpus, shared, "NVIDIA H200", str(tmp_path))
    return plan, job, Context(plan, found)


def test_without_nccl_ep_the_reason_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nccl.ep", None)   # import nccl.ep raises ImportError
    entry = next(i for i in impls.discover() if i["name"] == "nccl-ep")
    assert not entry["importable"] and not entry["available"] and "pip install nccl-extensions" in entry["reason"]
    plan, job, ctx = _setup(tmp_path, ("dispatch", "combine"), 512)
    ctx.gpu = True
    assert nccl_ep.cases(ctx, job, ("dispatch", "combine"), False) == ([], None)
    assert ctx.skipped == [{"what": "dispatch,combine", "impl": "nccl-ep", "reason": entry["reason"], "failed": False}]


def test_where_nccl_ep_refuses_to_run(fake_ep, tmp_path):
    fake_ep()
    entry = next(i for i in impls.discover() if i["name"] == "nccl-ep")
    assert entry["available"] and entry["version"] == "0.1.0 (libnccl_ep 0.2.0)"
    _, job, ctx = _setup(tmp_path, ("dispatch",), 512, backend="nccl")
    assert nccl_ep.why_not(ctx, job) == "needs CUDA GPUs"
    ctx.gpu = True
    assert nccl_ep.why_not(ctx, job) is None
    _, job, ctx = _setup(tmp_path, ("dispatch",), 512, world=2, num_gpus=1, shared=True)
    ctx.gpu = True
    assert nccl_ep.why_not(ctx, job) == ("NCCL refuses two ranks on one GPU: NCCL EP needs one GPU per rank "
                                         "(2 ranks share 1 GPU here)")
    _, job, ctx = _setup(tmp_path, ("dispatch",), 512, world=16, backend="nccl", num_gpus=16)
    ctx.gpu = True
    assert "at most 8 ranks" in nccl_ep.why_not(ctx, job)


def _run(ctx, job, model, whats):
    session = nccl_ep.Session(dist.group.WORLD)
    try:
        if "dispatch" in whats or "combine" in whats:
            nccl_ep.run_normal(ctx, job, session, model, tuple(w for w in whats if w != "low_latency"))
        if "low_latency" in whats:
            nccl_ep.run_low_latency(ctx, job, session, model)
    finally:
        session.close()


def test_runner_rows_with_a_one_rank_nccl_ep(fake_ep, tmp_path):
    ep = fake_ep()
    whats = ("dispatch", "combine", "low_latency")
    with group_of_one():
        _, job, ctx = _setup(tmp_path, whats, 512)
        _run(ctx, job, Model(512, 8, 2), whats)
    assert not ctx.skipped
    got = [(r["what"], r["op"], r["tokens"], r["note"]) for r in ctx.rows]
    assert got == [("dispatch", "dispatch", 8, "bf16, routing update + dispatch + count read-back"),
                   ("combine", "combine", 8, "bf16"),
                   ("dispatch", "dispatch", 24, "bf16, routing update + dispatch + count read-back"),
                   ("combine", "combine", 24, "bf16"),
                   ("low_latency", "dispatch", 8, "fp8, M=24"), ("low_latency", "combine", 8, "bf16, M=24"),
                   ("low_latency", "dispatch", 24, "fp8, M=24"), ("low_latency", "combine", 24, "bf16, M=24")]
    for r in ctx.rows:
        assert r["impl"] == "nccl-ep" and r["version"] == "0.1.0 (libnccl_ep 0.2.0)" and r["check"] == "ok", r
        assert r["mode"] == "host" and r["ranks"] == 1 and r["median_us"] > 0
    # one rank: every token is received once (normal-mode bytes), no message leaves the rank (low latency)
    assert [r["bytes_moved"] for r in ctx.rows if r["what"] != "low_latency"] == [8 * 1024] * 2 + [24 * 1024] * 2
    assert all(r["bytes_moved"] == 0 for r in ctx.rows if r["what"] == "low_latency")
    # groups as NCCL EP wants them: HT with a fixed receive budget, LL for M tokens; all released
    ht, ll = ep.groups
    assert (ht.config.algorithm, ht.config.max_dispatch_tokens_per_rank, ht.config.max_recv_tokens_per_rank,
            ht.config.max_token_bytes, ht.config.num_experts) == (ep.Algorithm.HIGH_THROUGHPUT, 24, 24, 1024, 8)
    assert (ll.config.algorithm, ll.config.max_dispatch_tokens_per_rank) == (ep.Algorithm.LOW_LATENCY, 24)
    assert ht.destroyed and ll.destroyed and all(h.destroyed for g in ep.groups for h in g.handles)
    assert [c.destroyed for c in ep.comms] == [True]
    # a new handle per token count; the timed loop reuses it (HT updates its routing, LL keeps it)
    assert len(ht.handles) == 2 and len(ll.handles) == 2


def test_bf16_dispatch_where_its_fp8_recipe_does_not_apply(fake_ep, tmp_path):
    fake_ep()
    with group_of_one():
        _, job, ctx = _setup(tmp_path, ("low_latency",), 256)
        _run(ctx, job, Model(256, 8, 2), ("low_latency",))
    assert [s["reason"] for s in ctx.skipped] == [
        "FP8 dispatch: hidden 256 is not a multiple of 512 (its DS_FP8E3M4 recipe); its dispatch rows are bf16"]
    assert {r["note"] for r in ctx.rows if r["op"] == "dispatch"} == {"bf16, M=24"}
    assert all(r["check"] == "ok" for r in ctx.rows)


def test_a_wrong_combine_is_a_mismatch(fake_ep, tmp_path):
    fake_ep(wrong_combine=True)
    whats = ("dispatch", "combine", "low_latency")
    with group_of_one():
        _, job, ctx = _setup(tmp_path, whats, 512)
        _run(ctx, job, Model(512, 8, 2), whats)
    assert {r["check"] for r in ctx.rows} == {"MISMATCH"}


def test_run_comm_records_a_failed_start_as_a_skip(fake_ep, tmp_path, monkeypatch):
    fake_ep(group_error="ncclInternalError: no GIN support")
    monkeypatch.setattr(nccl_ep, "why_not", lambda ctx, job: None)
    flushes = []
    with group_of_one():
        _, job, ctx = _setup(tmp_path, ("dispatch", "combine"), 512)
        comm.run_comm(ctx, job, flush=lambda: flushes.append(len(ctx.rows)))
    ours = [s for s in ctx.skipped if s["impl"] == "nccl-ep"]
    assert ours == [{"what": "dispatch,combine", "impl": "nccl-ep", "failed": False,
                     "reason": "could not start: no HIGH_THROUGHPUT group (RuntimeError: ncclInternalError: no GIN "
                               "support)"}]
    # the torch backend ran first, its rows saved before NCCL EP's case
    assert {r["impl"] for r in ctx.rows} == {"epkern-torch"} and flushes == [4, 4]
