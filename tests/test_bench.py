"""`epkern bench` / `epkern tune` on CPU: option errors, the CPU run end to end (JSON, CSV, PNG),
the result writer and plots on GPU-shaped rows, rank modes, DeepEP alias detection, tune's choice."""
import csv
import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from epkern import cli
from epkern.bench import impls, report, tune
from epkern.bench.ranks import SHARED_NOTE, mode_for
from epkern.bench.sweep import CPU_TOKENS, build_plan

TINY = ["--tokens", "16,32", "--hidden", "256", "--experts", "16", "--topk", "4", "--repeats", "2", "--warmup", "1"]


@pytest.mark.parametrize("argv, message", [
    (["bench", "--tokens", "16,x"], "argument --tokens: 'x' is not an integer"),
    (["bench", "--tokens", "0"], "argument --tokens: 0 must be 1..1048576"),
    (["bench", "--tokens", "16,,32"], "argument --tokens: expected a comma-separated list"),
    (["bench", "--what", "dispatch,gemm"], "argument --what: gemm unknown; choose from dispatch,combine,"),
    (["bench", "--hidden", "100"], "argument --hidden: 100 must be 8..65536 and a multiple of 8"),
    (["bench", "--topk", "40"], "argument --topk: 40 must be 1..32"),
    (["bench", "--ranks", "0"], "argument --ranks: 0 must be 1..64"),
    (["bench", "--num-sms", "200"], "argument --num-sms: 200 must be 1..132"),
    (["bench", "--repeats", "0"], "argument --repeats: 0 must be >= 1"),
    (["bench", "--experts", "10", "--ranks", "4"], "--experts: 10 experts do not split over 4 ranks"),
    (["bench", "--experts", "8", "--topk", "16"], "--topk: 16 exceeds --experts 8"),
    (["bench", "--config", "deploy.json", "--hidden", "4096"], "pass it or --hidden/--experts/--topk, not both"),
    (["bench", "--config", "/nonexistent/deploy.json"], "No such file"),
    (["tune", "--tokens", "-5"], "argument --tokens: -5 must be 1..1048576"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"epkern {argv[0]}: error: ") and message in last, last


def test_plan_from_a_deployment_config(tmp_path):
    config = tmp_path / "deploy.json"
    config.write_text(json.dumps([{"hidden": 2048, "num_experts": 32, "num_topk": 4, "ep_sizes": [2, 4]},
                                  {"hidden": 4096, "num_experts": 64, "num_topk": 8, "ep_sizes": [4]}]))
    plan = build_plan(("dispatch", "fp8"), None, None, None, None, None, None, str(config), tmp_path, "cpu", 0)
    assert [(m.hidden, m.experts, m.topk) for m in plan.models] == [(2048, 32, 4), (4096, 64, 8)]
    assert plan.ep_sizes == (2, 4)
    assert plan.tokens == {"dispatch": CPU_TOKENS["dispatch"], "fp8": CPU_TOKENS["fp8"]}
    assert plan.comm_whats == ("dispatch",) and plan.local_whats == ("fp8",)
    # --ranks overrides the config's EP sizes; GPU defaults: one rank per GPU, 50 repeats
    plan = build_plan(("dispatch",), (8,), None, None, None, None, (8,), str(config), tmp_path, "cuda", 8)
    assert plan.ep_sizes == (8,) and plan.repeats == 50 and plan.tokens == {"dispatch": (8,)}


def test_rank_modes():
    assert mode_for(2, 0)[:2] == ("gloo", False) and "CPU" in mode_for(2, 0)[2]
    assert mode_for(2, 2) == ("nccl", False, None)
    backend, shared, note = mode_for(4, 1)
    assert (backend, shared) == ("gloo", True) and note.startswith(SHARED_NOTE) and "4 ranks on 1 GPU" in note


def test_cpu_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--what", "dispatch,combine,fp8,layout,lplb,low_latency,moe", *TINY, "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert doc["device"]["name"] == "cpu" and doc["epkern_version"] and doc["commit"] and doc["date"]
    assert doc["device"]["driver"] == "none"
    rows = doc["rows"]
    kinds = {(r["what"], r["op"], r["impl"]) for r in rows}
    assert kinds == {("fp8", "cast", "torch"), ("layout", "layout", "torch"), ("lplb", "solve", "epkern"),
                     ("lplb", "run", "epkern"), ("dispatch", "dispatch", "epkern-torch"),
                     ("combine", "combine", "epkern-torch")}
    for r in rows:
        assert r["mode"] == "host" and r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["check"] in ("ok", "reference"), r
        assert r["version"]
    comm = [r for r in rows if r["what"] in ("dispatch", "combine")]
    assert sorted(r["tokens"] for r in comm) == [16, 16, 32, 32]
    assert all(r["ranks"] == 2 and r["bandwidth_gbs"] > 0 and "slowest_rank_median_us" in r for r in comm)
    skipped = {(s["what"], s["impl"]) for s in doc["skipped"]}
    assert {("low_latency", ""), ("moe", ""), ("dispatch,combine", "epkern")} <= skipped
    assert "no GPU: 2 ranks on CPU over gloo (torch backend only)" in doc["notes"]
    # the CSV holds the same rows
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert [(t["what"], t["impl"], t["tokens"]) for t in table] == [(r["what"], r["impl"], str(r["tokens"] or ""))
                                                                    for r in rows]
    # one PNG per (kernel, op, shape) with tokens: fp8, layout, lplb run, dispatch, combine
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 5, pngs
    import matplotlib.image

    for name in pngs:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    # the summary: every row, the skips, the files
    assert "skipped:" in stdout and "low_latency: needs CUDA GPUs" in stdout and "results.csv" in stdout
    if not any(i["importable"] for i in impls.discover() if i["name"] in ("deepep", "nccl-ep")):
        assert "no other implementation importable" in stdout


def _gpu_rows():
    """Rows shaped as a GPU run makes them: graph and eager, two implementations, floors."""
    rows = []
    for impl, scale in (("epkern", 1.0), ("deepep", 1.4)):
        for mode in ("graph", "eager"):
            for tokens in (128, 512, 4096):
                us = scale * (20 + tokens / 16) * (1.2 if mode == "eager" else 1.0)
                timing = {"median_us": us, "p10_us": us * 0.95, "p90_us": us * 1.1, "mean_us": us, "min_us": us * 0.9,
                          "repeats": 50}
                rows.append(report.make_row("dispatch", "dispatch", impl, "1.0", mode, timing,
                                            bytes_moved=tokens * 7168 * 2, floor_bw=393e9, check="ok", tokens=tokens,
                                            hidden=7168, experts=256, topk=8, ranks=2, num_sms=24))
    return rows


def test_writer_and_plots_on_gpu_rows(tmp_path):
    rows = _gpu_rows()
    assert rows[0]["fraction_of_floor"] == pytest.approx(rows[0]["floor_us"] / rows[0]["median_us"])
    with pytest.raises(ValueError, match="mode='profile'"):
        report.make_row("fp8", "cast", "epkern", "1", "profile", rows[0])
    report.write_csv(tmp_path / "results.csv", rows)
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12 and float(table[0]["fraction_of_floor"]) > 0 and table[0]["num_sms"] == "24"
    (png,) = report.write_plots(tmp_path, rows, "NVIDIA H200, epkern 0.1.0")
    assert png.name == "dispatch_h7168_e256_k8_R2.png"
    series = report._series(rows)[("dispatch", "dispatch", "h7168 e256 k8 R2")]
    assert sorted(series) == ["deepep 1.0 (eager, 24 SMs)", "deepep 1.0 (graph, 24 SMs)",
                              "epkern 1.0 (eager, 24 SMs)", "epkern 1.0 (graph, 24 SMs)", "floor"]
    assert series["floor"] == [(t, t * 7168 * 2 / 393e9 * 1e6, None) for t in (128, 512, 4096)]
    header = {"device": {"name": "NVIDIA H200", "count": 1, "driver": "13.0", "torch": "2.13"},
              "epkern_version": "0.1.0", "commit": "abc", "notes": [SHARED_NOTE],
              "implementations": [{"name": "deepep", "importable": True, "available": True, "version": "1.2.1",
                                   "reason": ""},
                                  {"name": "nccl-ep", "importable": False, "available": False, "version": "",
                                   "reason": "not importable"}]}
    text = report.summary(header, rows, [], [png])
    assert "deepep 1.2.1: side by side" in text and f"note: {SHARED_NOTE}" in text
    assert "no other implementation importable" not in text
    # importable, but no rows: the summary says why
    header["implementations"][1].update(importable=True, available=True, version="0.1.0", reason="")
    why = {"what": "dispatch", "impl": "nccl-ep", "reason": "NCCL refuses two ranks on one GPU", "failed": False}
    assert "nccl-ep 0.1.0: not run: NCCL refuses two ranks on one GPU" in report.summary(header, rows, [why], [png])
    assert "nccl-ep 0.1.0: importable; none of the families" in report.summary(header, rows, [], [png])
    assert len([line for line in text.splitlines() if line.startswith("dispatch")]) == 12


def test_deepep_alias_is_not_deepep(monkeypatch):
    import epkern

    monkeypatch.setitem(sys.modules, "deep_ep", types.SimpleNamespace(Buffer=epkern.Buffer))
    mod, why = impls.deepep_module()
    assert mod is None and "alias" in why
    real = types.SimpleNamespace(Buffer=type("Buffer", (), {"__module__": "deep_ep.buffer"}), __version__="1.2.1")
    monkeypatch.setitem(sys.modules, "deep_ep", real)
    assert impls.deepep_module() == (real, None)
    entry = next(i for i in impls.discover() if i["name"] == "deepep")
    assert entry["available"] and entry["version"] == "1.2.1"


def _tune_row(kernel, sms, tokens, us, check="ok", ranks=2):
    t = {"median_us": us, "p10_us": us, "p90_us": us, "mean_us": us, "min_us": us, "repeats": 5}
    return report.make_row(kernel, kernel, "epkern", "0.1.0", "eager", t, check=check, tokens=tokens, hidden=7168,
                           experts=256, topk=8, ranks=ranks, num_sms=sms)


def test_tune_keeps_the_fastest_checked_config(monkeypatch):
    monkeypatch.delenv("EPKERN_TUNED_CONFIG", raising=False)
    rows = [_tune_row("dispatch", 16, 128, 50), _tune_row("dispatch", 16, 4096, 400),
            _tune_row("dispatch", 24, 128, 60), _tune_row("dispatch", 24, 4096, 300),   # 360 total: fastest
            _tune_row("dispatch", 32, 128, 10, check="MISMATCH"), _tune_row("dispatch", 32, 4096, 10),
            _tune_row("combine", 20, 4096, 500), _tune_row("combine", 48, 4096, 450)]
    entries = {e["kernel"]: e for e in tune.choose(rows)}
    d = entries["dispatch"]
    assert d["config"]["num_sms"] == 24 and d["median_us"] == 360 and d["tokens"] == [128, 4096]
    assert d["candidates"] == {"16": 450, "24": 360}          # 32 lacks a checked 128-token row
    assert d["config"]["num_max_nvl_chunked_send_tokens"] == 24  # Buffer's EP2 dispatch default, kept
    assert entries["combine"]["config"]["num_sms"] == 48 and entries["combine"]["default_num_sms"] == 20


def test_tune_on_cpu_says_why(capsys):
    assert cli.main(["tune", "--tokens", "16", "--hidden", "256", "--experts", "16", "--topk", "4"]) == 1
    assert "epkern tune needs a CUDA GPU" in capsys.readouterr().out


def test_candidates_fit_the_gpu():
    assert tune.candidates(None, 132) == tune.DEFAULT_SMS
    assert tune.candidates((8, 78, 100), 78) == (8, 78)
    with pytest.raises(ValueError, match="no candidate fits this GPU"):
        tune.candidates((100,), 78)


def test_bench_results_have_torch_versions():
    entry = next(i for i in impls.discover() if i["name"] == "epkern-torch")
    assert torch.__version__ in entry["version"]


# -- the runners' GPU-only branches, driven on CPU: SM sweeps and the low-latency flow ------------------
class _FakeLowLatency:
    """DeepEP's low-latency API without communication (each rank's tokens stay home): enough to run
    the bench runner's flow, checks and rows; epkern's real buffer is tested in test_low_latency_*."""

    def __init__(self, num_ranks, num_sms):
        self.num_ranks = num_ranks
        self.num_sms = min(num_sms, 12)   # as if the GPU had 12 SMs

    def low_latency_dispatch(self, x, topk_idx, M, E, use_fp8=True):
        recv = torch.zeros(E // self.num_ranks, self.num_ranks * M, x.shape[1], dtype=torch.bfloat16)
        return (recv, torch.zeros(E // self.num_ranks, dtype=torch.int32), (x,), None, None)

    def low_latency_combine(self, x, topk_idx, weights, handle):
        (original,) = handle
        return (original.float() * weights.sum(1, keepdim=True)).to(torch.bfloat16), None, None


def _runner_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    import epkern
    from epkern.bench import comm
    from epkern.bench.local import Context
    from epkern.bench.ranks import Job
    from epkern.bench.sweep import Model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        plan = build_plan(("dispatch", "combine", "low_latency"), (8, 24), (256,), (16,), (4,), (8, 16), (world,),
                          None, out_dir, "cpu", 0, 0, 2)
        job = Job(plan, impls.discover(), world, port, "gloo", 0, False, "cpu", out_dir)
        ctx = Context(plan, job.impls)
        model = Model(256, 16, 4)
        # the NVLink implementation's branches (SM sweep, default SM count) with the portable backend
        ours = comm._Impl("epkern", lambda max_tokens, m: epkern.Buffer(dist.group.WORLD, backend="torch"),
                          lambda sms: None if sms is None else epkern.Config(sms), True)
        comm.run_normal(ctx, job, ours, model, ("dispatch", "combine"))
        ctx.plan = dataclasses.replace(plan, num_sms=None)
        comm.run_normal(ctx, job, ours, model, ("combine",))
        ctx.plan = plan
        comm.run_low_latency(ctx, job, "epkern", lambda M, m, sms: _FakeLowLatency(world, sms), model)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(ctx.rows))
    finally:
        dist.destroy_process_group()


def test_runner_branches_on_cpu(tmp_path):
    import torch.multiprocessing as mp

    from epkern.bench.ranks import free_port

    mp.spawn(_runner_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rows = json.loads((tmp_path / "rank0.json").read_text())
    normal = [(r["op"], r["tokens"], r["num_sms"]) for r in rows if r["what"] in ("dispatch", "combine")]
    assert normal == [(op, t, s) for t in (8, 24) for s in (8, 16) for op in ("dispatch", "combine")] + \
                     [("combine", t, 20) for t in (8, 24)]       # Buffer's default SM count when none given
    ll = [r for r in rows if r["what"] == "low_latency"]
    assert [(r["op"], r["tokens"], r["num_sms"]) for r in ll] == [(op, t, s) for s in (8, 12) for t in (8, 24)
                                                                   for op in ("dispatch", "combine")]
    for r in rows:
        assert r["check"] == "ok" and r["mode"] == "host" and r["ranks"] == 2 and r["median_us"] > 0, r
    assert all(r["note"] == "fp8, M=24" for r in ll if r["op"] == "dispatch")
    # bytes: the (token, other rank) messages, fp8 rows with scales for dispatch and bf16 rows for combine
    d, c = ll[0], ll[1]
    assert d["bytes_moved"] * 2 * 256 == c["bytes_moved"] * (256 + 256 // 128 * 4)
    # tune's choice reads these rows (eager on a GPU, host here)
    for r in rows:
        r["mode"] = "eager"
    entries = {e["kernel"]: e for e in tune.choose(rows)}
    assert entries["dispatch"]["config"]["num_sms"] in (8, 16) and entries["dispatch"]["tokens"] == [8, 24]
    assert set(entries["combine"]["candidates"]) == {"8", "16", "20"}


def test_local_gpu_branches_on_cpu(tmp_path, monkeypatch):
    """The single-process runners' GPU branches (epkern's kernel beside the torch definition, graph
    and eager rows, floors) with CPU tensors, which epkern's functions accept (they run the reference)."""
    from epkern.bench.local import RUNNERS, Context

    plan = build_plan(("fp8", "layout", "lplb"), (16, 32), (256,), (16,), (4,), None, (2,), None, tmp_path, "cpu",
                      0, 1, 2)
    monkeypatch.setenv("EPKERN_CHECK_VALUES", "1")
    ctx = Context(plan, impls.discover())
    ctx.gpu, ctx._copy_bw = True, 1e11
    monkeypatch.setattr(ctx.bench, "rotating", lambda make, nbytes: [make(), make()])
    def host_times(what, fn, inputs, calls, graph=True, repeats=None):
        modes = ("graph", "eager") if graph else ("eager",)
        return [(mode, ctx.bench.time_host(fn, inputs, repeats=repeats)) for mode in modes]

    monkeypatch.setattr(ctx, "times", host_times)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=4))
    for what in plan.whats:
        RUNNERS[what](ctx, plan.models[0])
    assert not ctx.skipped
    got = sorted({(r["what"], r["op"], r["impl"], r["mode"], r["check"]) for r in ctx.rows})
    assert got == [("fp8", "cast", "epkern", "eager", "ok"), ("fp8", "cast", "epkern", "graph", "ok"),
                   ("fp8", "cast", "torch", "eager", "reference"),
                   ("layout", "layout", "epkern", "eager", "ok"), ("layout", "layout", "epkern", "graph", "ok"),
                   ("layout", "layout", "torch", "eager", "reference"),
                   ("lplb", "run", "epkern", "eager", "ok"), ("lplb", "run", "epkern", "graph", "ok"),
                   ("lplb", "solve", "epkern", "eager", "ok"), ("lplb", "solve", "epkern", "graph", "ok")]
    fp8 = [r for r in ctx.rows if r["what"] == "fp8"]
    assert all(r["floor_us"] == pytest.approx(r["bytes_moved"] / 1e11 * 1e6) for r in fp8)
    assert {r["tokens"] for r in fp8} == {16, 32}
    layout_eager = [r for r in ctx.rows if r["what"] == "layout" and r["impl"] == "epkern" and r["mode"] == "eager"]
    assert all("EPKERN_CHECK_VALUES" in r["note"] for r in layout_eager)


def test_commit_prefers_epkern_commit(monkeypatch):
    from epkern.bench.timing import git_commit

    monkeypatch.setenv("EPKERN_COMMIT", "0123456789ab")
    assert git_commit() == "0123456789ab"
    monkeypatch.delenv("EPKERN_COMMIT")
    commit = git_commit()   # this checkout's, or 'unknown' outside one
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 12
