"""The per-signature fast paths without a GPU: launches stubbed (benchmarks.host_overhead.cpu_stub),
CPU tensors standing in for CUDA ones. What each fast call launches must equal what the first
(checked) call decided, and arguments that differ from the signature in any way must not hit it."""
import pytest
import torch

from benchmarks.host_overhead import cpu_stub, seed_cast, seed_cast_back, seed_layout, seed_run
from epkern import fp8, get_dispatch_layout, per_token_cast_back, per_token_cast_to_fp8
from epkern.codegen import LaunchError
from epkern.codegen.launch import Launcher, set_launch_hook


def test_launcher_packs_each_code_into_its_slot():
    calls = []
    launcher = Launcher(None, "k", 3, 128, "pqiIf")
    previous = set_launch_hook(lambda launcher, stream, values: calls.append((stream, values)))
    try:
        launcher(7, 0xDEADBEEF000, -(1 << 40), -5, 1 << 31, 0.5)
        assert calls == [(7, (0xDEADBEEF000, -(1 << 40), -5, 1 << 31, 0.5))]
        assert launcher.values() == (0xDEADBEEF000, -(1 << 40), -5, 1 << 31, 0.5)
        assert launcher.grid == (3, 1, 1) and launcher.block == (128, 1, 1)
        with pytest.raises(LaunchError, match="do not fit the codes 'pqiIf'"):
            launcher(7, 1, 2, 1 << 31, 0, 0.0)  # int32 overflow
        with pytest.raises(LaunchError, match="do not fit"):
            launcher(7, 1, 2)
    finally:
        set_launch_hook(previous)


def test_launcher_refuses_unknown_codes():
    with pytest.raises(ValueError, match="argument codes"):
        Launcher(None, "k", 1, 32, "px")


def test_cast_fast_path_launches_what_the_signature_decided():
    calls = []
    with cpu_stub(calls):
        x = torch.randn(64, 1024, dtype=torch.bfloat16)
        seed_cast(x)
        for _ in range(2):
            q, s = per_token_cast_to_fp8(x)
        assert q.shape == (64, 1024) and q.dtype == torch.float8_e4m3fn and s.shape == (64, 8)
        name, values = calls[-1]
        assert name.endswith("_cast") and values == (x.data_ptr(), 1024, 64, q.data_ptr(), s.data_ptr(), 8)
        assert len(calls) == 2
        # anything else than the seeded signature takes the checked path (the CPU reference here)
        for kwargs in ({"round_scale": True}, {"group_size": 64}, {"scale_layout": "col"}):
            per_token_cast_to_fp8(x, **kwargs)
        per_token_cast_to_fp8(x[:32])
        per_token_cast_to_fp8(x.float())
        assert len(calls) == 2
        with pytest.raises(TypeError, match="round_scale=1"):
            per_token_cast_to_fp8(x, round_scale=1)  # equal to False's hash: must not hit the plan
        with pytest.raises((TypeError, ValueError)):  # equal to 128's hash: must not hit the plan
            per_token_cast_to_fp8(x, group_size=128.0)
        assert len(calls) == 2


def test_cast_fast_path_column_scales_and_unaligned_input():
    calls = []
    with cpu_stub(calls):
        x = torch.randn(6, 512, dtype=torch.bfloat16)
        seed_cast(x, scale_layout="col")
        q, s = per_token_cast_to_fp8(x, scale_layout="col")
        assert s.shape == (6, 4) and s.stride() == (1, 8)
        assert calls[-1][1] == (x.data_ptr(), 512, 6, q.data_ptr(), s.data_ptr(), 8)
        n = len(calls)
        base = torch.randn(6 * 512 + 1, dtype=torch.bfloat16)
        per_token_cast_to_fp8(base[1:].view(6, 512), scale_layout="col")  # not 16-byte aligned: checked path
        assert len(calls) == n


def test_cast_back_fast_path():
    calls = []
    with cpu_stub(calls):
        q = torch.zeros(64, 1024, dtype=torch.float8_e4m3fn)
        s = torch.ones(64, 8)
        seed_cast_back(q, s)
        out = per_token_cast_back(q, s)
        assert out.shape == (64, 1024) and out.dtype == torch.bfloat16
        assert calls[-1][1] == (q.data_ptr(), 1024, 64, s.data_ptr(), 8, out.data_ptr())
        per_token_cast_back(q, s, out_dtype=torch.float32)
        per_token_cast_back(q, torch.ones(64, 2, dtype=torch.int32))
        assert len(calls) == 1


def test_layout_fast_path_and_level_in_the_signature(monkeypatch):
    calls = []
    with cpu_stub(calls):
        topk = torch.randint(0, 256, (100, 8))
        plan = seed_layout(topk, 256, 8)
        per_rank, per_expert, in_rank = get_dispatch_layout(topk, 256, 8)
        assert per_rank.shape == (8,) and per_expert.shape == (256,) and in_rank.shape == (100, 8)
        values = calls[-1][1]
        assert values[:5] == (topk.data_ptr(), 100, per_rank.data_ptr(), per_expert.data_ptr(), in_rank.data_ptr())
        assert values[-2:] == (0x1000, 0x2000)  # the error words of this call site
        assert plan.launch.grid == (1, 1, 1)
        monkeypatch.setenv("EPKERN_CHECK_VALUES", "0")
        get_dispatch_layout(topk, 256, 8)  # another level, another signature: the reference ran
        with pytest.raises(ValueError, match="num_experts=256.0"):
            get_dispatch_layout(topk, 256.0, 8)
        assert len(calls) == 1


def test_run_fast_path_launches_count_solve_map():
    from epkern.solver import Planner, cube_8p2e

    calls = []
    with cpu_stub(calls, fused=False):
        planner = Planner(cube_8p2e(), 256 + 16, 256, 8, device="cpu")
        idx, counter = torch.randint(0, 256, (512, 8)), torch.zeros(1, dtype=torch.int32)
        plan = seed_run(planner, idx, counter, n_sms=16)
        out = planner.run(idx, counter)
        assert out.shape == idx.shape and out.dtype == torch.int64
        names = [name for name, _ in calls]
        assert names[0].endswith("_count") and names[1].startswith("lplb_ipm") and names[2].endswith("_map")
        count, solve, mapping = (v for _, v in calls)
        assert count[:2] == (idx.data_ptr(), idx.numel()) and mapping[0] == idx.data_ptr()
        assert mapping[-1] == out.data_ptr() and solve[9] == counter.data_ptr()
        assert solve[2] == planner.phy2log.data_ptr() and solve[6] == planner._prev_probs.data_ptr()
        assert planner.last_status is plan.buffers[0].status
        planner.update_redundancy_mapping(torch.arange(256, dtype=torch.float64))  # new tables: plan unusable
        assert not plan.valid(planner)
        planner.run(idx, counter)  # CPU planner: the reference path
        assert len(calls) == 3


def test_run_fast_path_one_kernel():
    from epkern.solver import Planner, cube_8p2e
    from epkern.solver.run_kernel import RUN_CODES

    calls = []
    with cpu_stub(calls, fused=True):
        planner = Planner(cube_8p2e(), 256 + 64, 256, 32, device="cpu")
        idx, counter = torch.randint(0, 256, (512, 8)), torch.zeros(1, dtype=torch.int32)
        plan = seed_run(planner, idx, counter, n_sms=16)
        out = planner.run(idx, counter)
        assert [name for name, _ in calls] == [plan.fused_launch.name] and plan.fused_launch.cooperative
        values = calls[0][1]
        assert len(values) == len(RUN_CODES) == 21
        assert values[:2] == (idx.data_ptr(), idx.numel()) and values[5] == planner.phy2log.data_ptr()
        assert values[6] == planner.n_local_logical_routed_experts - 2 * planner.combined_redundant_experts
        assert values[12] == counter.data_ptr() and values[15] == planner.n_group == 4
        assert values[16:19] == (planner._log2var.data_ptr(), planner._log2phy.data_ptr(), out.data_ptr())


@pytest.mark.gpu
def test_launcher_values_reach_the_kernel_and_a_wrong_size_is_refused():
    """Every value of a mixed parameter list (int32, pointer, float, uint32) reaches the kernel; codes
    whose sizes differ from the kernel's parameters are refused when the Launcher is made."""
    from cuda.core import Device, Program, ProgramOptions

    torch.cuda.init()
    Device(0).set_current()
    src = ('extern "C" __global__ void k(int n, long long* out, float f, unsigned u)'
           ' { out[0] = n; out[1] = (long long)(f * 4); out[2] = u; }')
    code = Program(src, "c++", ProgramOptions(arch="sm_%d%d" % torch.cuda.get_device_capability())).compile("cubin")
    kernel = code.get_kernel("k").handle
    out = torch.zeros(3, dtype=torch.int64, device="cuda")
    Launcher(kernel, "k", 1, 1, "ipfI")(torch.cuda.current_stream().cuda_stream, -7, out.data_ptr(), 2.5, 1 << 31)
    assert out.tolist() == [-7, 10, 1 << 31]
    with pytest.raises(LaunchError, match="takes parameters of"):
        Launcher(kernel, "k", 1, 1, "pifI")


@pytest.mark.parametrize("shape", [(128, 7168), (0, 56), (4, 0, 3), (8,)])
def test_fresh_output_is_a_new_contiguous_tensor_each_call(shape):
    from epkern.call_plans import fresh_output

    new = fresh_output(shape, torch.float8_e4m3fn, torch.device("cpu"))
    a, b = new(), new()
    assert a.shape == shape and a.dtype == torch.float8_e4m3fn and a.is_contiguous()
    assert a.stride() == torch.empty(shape).stride()
    assert a.numel() == 0 or a.data_ptr() != b.data_ptr()
