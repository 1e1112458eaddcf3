"""`epkern bench --what moe` on CPU: the plan (--intermediate, progress steps), the skip without a GPU,
the floors (bytes or FLOPs at the peak), and the runner's flow with the portable backend standing in
for the NVLink one (the layer's prefill path, its check against the per-expert reference, the rows)."""
import json

import pytest
import torch

from epkern import cli
from epkern.bench import devices, impls, local
from epkern.bench.sweep import MOE_INTERMEDIATE, Model, build_plan


def test_plan_and_options(tmp_path, capsys):
    plan = build_plan(("moe",), (128, 4096), None, None, None, None, None, None, tmp_path, "cuda", 1)
    assert plan.moe_intermediate == MOE_INTERMEDIATE == 2048 and plan.tokens == {"moe": (128, 4096)}
    assert local.units(plan) == 2
    plan = build_plan(("moe",), None, None, None, None, None, None, None, tmp_path, "cuda", 1, intermediate=512)
    assert plan.moe_intermediate == 512
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--what", "moe", "--intermediate", "100"])
    assert info.value.code == 2
    assert "argument --intermediate: 100 must be 8..65536 and a multiple of 8" in capsys.readouterr().err


def test_moe_is_skipped_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--what", "moe", "--hidden", "256", "--experts", "8", "--topk", "2", "--out", str(out),
                     "--no-plots"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["rows"] == []
    assert doc["skipped"] == [{"what": "moe", "impl": "", "failed": False,
                               "reason": "needs CUDA GPUs (the fused MoE layer); this machine has none"}]
    assert "moe: needs CUDA GPUs" in capsys.readouterr().out


def test_floors():
    assert local.moe_flops(128, 8, 7168, 2048) == 6 * 128 * 8 * 7168 * 2048
    assert devices.dense_bf16_peak("NVIDIA H200") == devices.dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert devices.dense_bf16_peak("NVIDIA H100 PCIe") == 756e12 and devices.dense_bf16_peak("NVIDIA A100") is None
    # bytes bind: 1 GB at 10 TB/s is 100 us, 1 TFLOP at the peak 1 us
    row = local.moe_floor({"median_us": 100.0, "floor_us": 100.0}, 10**12 // 1000, 1e15)
    assert row["floor_bound"] == "bytes at the copy bandwidth" and row["floor_us"] == 100.0
    assert row["tflops"] == pytest.approx(10.0)
    # FLOPs bind
    row = local.moe_floor({"median_us": 100.0, "floor_us": 1.0}, 10**11, 1e15)
    assert row["floor_bound"] == "flops at the BF16 peak"
    assert row["floor_us"] == pytest.approx(100.0) and row["fraction_of_floor"] == pytest.approx(1.0)
    # no peak known (CPU, another GPU): the byte floor, or none
    assert "floor_bound" not in local.moe_floor({"median_us": 100.0}, 10**9, None)


def _gpu_branches(tmp_path, monkeypatch, tokens=(16, 40)):
    """The runner as on a GPU, with CPU tensors: the torch backend in place of the NVLink one (its
    Buffer has no low-latency half, so only prefill runs), host timings for graph and eager."""
    import epkern

    plan = build_plan(("moe",), tokens, (256,), (8,), (2,), None, None, None, tmp_path, "cpu", 0, 1, 2, intermediate=64)
    ctx = local.Context(plan, impls.discover())
    ctx.gpu, ctx._copy_bw = True, 1e11
    monkeypatch.setattr(local, "moe_buffer", lambda group, model, max_tokens, decode: epkern.Buffer(group,
                                                                                                    backend="torch"))

    def host_times(what, fn, inputs, calls, graph=True, repeats=None):
        modes = ("graph", "eager") if graph else ("eager",)
        return [(mode, ctx.bench.time_host(fn, inputs, repeats=repeats)) for mode in modes]

    monkeypatch.setattr(ctx, "times", host_times)
    return ctx


def test_runner_rows_on_cpu(tmp_path, monkeypatch):
    ctx = _gpu_branches(tmp_path, monkeypatch)
    local.run_moe(ctx, Model(256, 8, 2))
    assert ctx.skipped == [{"what": "moe", "impl": "", "failed": False,
                            "reason": "decode: the Buffer has no low-latency half here"}]
    assert [(r["op"], r["mode"], r["tokens"]) for r in ctx.rows] == [("prefill", "eager", 16), ("prefill", "eager", 40)]
    for r in ctx.rows:
        assert r["check"] == "ok" and r["ranks"] == 1 and r["intermediate"] == 64, r
        assert r["flops"] == 6 * r["tokens"] * 2 * 256 * 64 and r["tflops"] > 0
        assert r["floor_bound"] == "bytes at the copy bandwidth"   # no BF16 peak for a CPU device
        # the weights of the experts in use (8 of 8 here), x in and y out
        assert r["bytes_moved"] == 8 * 3 * 256 * 64 * 2 + 2 * r["tokens"] * 256 * 2
        assert "EP1" in r["note"] and "fp8 dispatch" in r["note"]
    import torch.distributed as dist

    assert not dist.is_initialized()   # the group of one is gone


def test_a_wrong_layer_is_a_mismatch(tmp_path, monkeypatch):
    ctx = _gpu_branches(tmp_path, monkeypatch, tokens=(16,))
    monkeypatch.setattr(local, "moe_reference", lambda layer, x: torch.zeros_like(x) + 1)
    local.run_moe(ctx, Model(256, 8, 2))
    assert [r["check"] for r in ctx.rows] == ["MISMATCH"]


def test_reference_is_the_per_token_math():
    from test_moe_cpu import _per_token_reference

    from epkern.moe import MoE

    layer = MoE(256, 64, 8, 3, seed=3)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert local.moe_close(local.moe_reference(layer, x), _per_token_reference(layer, x))
    assert local.moe_close(layer(x), local.moe_reference(layer, x))
    assert not local.moe_close(layer(x) * 1.1, local.moe_reference(layer, x))


def test_too_large_for_the_free_memory_is_skipped(tmp_path, monkeypatch):
    plan = build_plan(("moe",), (128,), (7168,), (256,), (8,), None, None, None, tmp_path, "cpu", 0)
    ctx = local.Context(plan, impls.discover())
    ctx.dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (40 << 30, 80 << 30))
    assert local.moe_skip_reason(ctx, Model(7168, 256, 8)) == (
        "the experts' weights (21.0 GiB, twice that while they are made) do not fit in the 40.0 GiB free: "
        "fewer --experts or a smaller --intermediate")
    assert local.moe_skip_reason(ctx, Model(7168, 64, 8)) is None


def test_hidden_without_fp8_groups_runs_prefill_in_bf16(tmp_path, monkeypatch):
    ctx = _gpu_branches(tmp_path, monkeypatch, tokens=(16,))
    local.run_moe(ctx, Model(200, 8, 2))
    assert [s["reason"] for s in ctx.skipped] == [
        "decode: hidden 200 is not a multiple of 128 (the low-latency kernels' FP8 groups)"]
    (row,) = ctx.rows
    assert row["op"] == "prefill" and row["check"] == "ok" and "bf16 dispatch" in row["note"]
