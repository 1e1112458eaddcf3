"""Low-latency kernels without a GPU: templates compile for R = 2, 4, 8, sizing, input validation."""
import pytest
import torch

from epkern.codegen import build
from epkern.deployment import Deployment
from epkern.low_latency.buffer import LowLatencyBuffer, get_low_latency_rdma_size_hint, max_dispatch_tokens_for_bytes
from epkern.low_latency.handle import LowLatencyHandle
from epkern.low_latency.kernels import KINDS, BarrierSpec, BufferLayout, LowLatencySpec, deployment_specs, dispatch_kind


def _compiles(spec) -> None:
    cubin = build(spec, "sm_90a").cubin
    entries = ("barrier",) if isinstance(spec, BarrierSpec) else ("send", "recv", "send_recv")
    for entry in entries:
        assert f"{spec.symbol}_{entry}".encode() in cubin, f"{spec.name}: no entry point {entry}"


# -- templates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_deepseek_shapes_compile(kind, num_ranks):
    _compiles(LowLatencySpec(kind, 7168, num_ranks, 256, 8))


@pytest.mark.parametrize("kind,hidden,num_ranks,num_experts,num_topk", [
    ("fp8_ue8m0", 128, 2, 2, 1),       # one scale group: a UE8M0 word padded with zero bytes
    ("fp8", 2944, 4, 128, 32),         # gpt-oss-like hidden (23 groups: odd 256-channel chunk), top-32
    ("fp8_round", 4096, 8, 64, 6),
    ("bf16", 384, 8, 288, 9),          # 36 experts per rank, top-9
    ("combine", 2944, 4, 128, 32),
    ("combine", 128, 2, 2, 1),
])
def test_other_shapes_compile(kind, hidden, num_ranks, num_experts, num_topk):
    _compiles(LowLatencySpec(kind, hidden, num_ranks, num_experts, num_topk))


@pytest.mark.parametrize("num_ranks", [1, 3, 64])
def test_barrier_compiles_for_any_rank_count(num_ranks):
    _compiles(BarrierSpec(num_ranks))


def test_barrier_rejects_more_ranks_than_threads():
    with pytest.raises(ValueError, match="num_ranks"):
        BarrierSpec(65)


def test_rendered_source_is_specialized():
    src = LowLatencySpec("fp8_ue8m0", 7168, 8, 256, 8).render()
    assert "constexpr int HIDDEN = 7168;" in src and "constexpr int NUM_RANKS = 8;" in src
    assert "epk_fp8_ue8m0" in src and "constexpr bool ROUND_SCALE = true;" in src
    bf16 = LowLatencySpec("bf16", 7168, 8, 256, 8).render()
    assert "epk_fp8_cast_group" not in bf16


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="fp16"), "kind"),
    (dict(hidden=7000), "hidden"),
    (dict(num_topk=33), "num_topk"),
    (dict(num_topk=0), "num_topk"),
    (dict(num_experts=250), "num_experts"),
    (dict(num_ranks=65), "num_ranks"),
])
def test_spec_rejects_bad_fields(kwargs, match):
    fields = dict(kind="fp8", hidden=7168, num_ranks=8, num_experts=256, num_topk=8) | kwargs
    with pytest.raises(ValueError, match=match):
        LowLatencySpec(**fields)


def test_names_are_readable_and_distinct():
    names = {LowLatencySpec(k, 7168, 8, 256, 8).name for k in KINDS}
    assert len(names) == len(KINDS)
    assert LowLatencySpec("fp8", 7168, 8, 256, 8).symbol == "low_latency_fp8_h7168_r8_e256_k8"


def test_dispatch_kind():
    assert dispatch_kind(False, False, False) == "bf16"
    assert dispatch_kind(True, False, False) == "fp8"
    assert dispatch_kind(True, True, False) == "fp8_round"
    assert dispatch_kind(True, True, True) == "fp8_ue8m0"
    with pytest.raises(ValueError, match="round_scale"):
        dispatch_kind(True, False, True)
    with pytest.raises(ValueError, match="use_fp8"):
        dispatch_kind(False, True, False)


def test_deployment_specs_cover_every_ep_size_and_kind():
    specs = deployment_specs(Deployment())
    barriers = [s for s in specs if isinstance(s, BarrierSpec)]
    specs = [s for s in specs if not isinstance(s, BarrierSpec)]
    assert {(s.num_ranks, s.kind) for s in specs} == {(r, k) for r in (2, 4, 8) for k in KINDS}
    assert all(s.hidden == 7168 and s.num_experts == 256 and s.num_topk == 8 for s in specs)
    assert barriers == [BarrierSpec(2), BarrierSpec(4), BarrierSpec(8)]   # offline clean_low_latency_buffer


# -- sizing ------------------------------------------------------------------------------------------
def test_size_hint_is_below_one_slot_per_expert():
    # the exact formula: tests/test_low_latency_variants_cpu.py::test_size_hint_formula. One slot per
    # (rank, token) instead of one per (expert, token): less than the send rows again
    M, H, E = 128, 7168, 256
    assert get_low_latency_rdma_size_hint(M, H, 8, E) < 256 + 2 * 2 * (E * M * (16 + 2 * H))


@pytest.mark.parametrize("hidden,num_ranks,num_experts", [(7168, 2, 256), (2944, 4, 128), (128, 2, 2), (4096, 8, 288)])
def test_inverse_is_the_largest_m_that_fits(hidden, num_ranks, num_experts):
    for budget in (0, 10**6, 10**8, 3 * 10**9, get_low_latency_rdma_size_hint(77, hidden, num_ranks, num_experts)):
        m = max_dispatch_tokens_for_bytes(budget, hidden, num_ranks, num_experts)
        if m > 0:
            assert get_low_latency_rdma_size_hint(m, hidden, num_ranks, num_experts) <= budget
        assert get_low_latency_rdma_size_hint(m + 1, hidden, num_ranks, num_experts) > budget
    exact = get_low_latency_rdma_size_hint(77, hidden, num_ranks, num_experts)
    assert max_dispatch_tokens_for_bytes(exact, hidden, num_ranks, num_experts) == 77
    assert max_dispatch_tokens_for_bytes(exact - 1, hidden, num_ranks, num_experts) == 76


def test_layout_regions_do_not_overlap():
    lay = BufferLayout(33, 2944, 4, 72)
    spans = []
    for idx in (0, 1):
        spans += [(lay.flags(idx), lay.flags_bytes), (lay.counts(idx), lay.counts_bytes),
                  (lay.weights(idx), lay.weights_bytes), (lay.recv(idx), lay.recv_bytes),
                  (lay.send(idx), lay.send_bytes)]
    spans.sort()
    assert spans[0][0] >= 256
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b and b % 16 == 0
    assert spans[-1][0] + spans[-1][1] <= lay.total_bytes


@pytest.mark.parametrize("args,match", [
    ((0, 7168, 2, 256), "num_max_dispatch_tokens_per_rank"),
    ((128, 7100, 2, 256), "hidden"),
    ((128, 7168, 3, 256), "num_experts"),
])
def test_size_hint_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        get_low_latency_rdma_size_hint(*args)


# -- input validation (raised before any launch; the buffer here has no peer memory) --------------------
@pytest.fixture
def cpu_buffer():
    buf = LowLatencyBuffer.__new__(LowLatencyBuffer)
    buf.rank, buf.num_ranks, buf.num_sms, buf.buffer_idx = 0, 2, 32, 0
    buf.device = torch.device("cpu")
    buf.num_bytes = get_low_latency_rdma_size_hint(16, 256, 2, 8)
    buf.mask = torch.zeros(2, dtype=torch.int32)
    return buf


def _inputs(tokens=4, hidden=256, topk=2, experts=8):
    x = torch.zeros(tokens, hidden, dtype=torch.bfloat16)
    idx = torch.arange(tokens * topk, dtype=torch.int64).view(tokens, topk) % experts
    return x, idx


@pytest.mark.parametrize("change,match", [
    (lambda x, i: (x.float(), i), "x: dtype"),
    (lambda x, i: (x, i.int()), "topk_idx: dtype"),
    (lambda x, i: (x[:, :200].contiguous(), i), "multiple of 128"),
    (lambda x, i: (x, i[:3]), "one per token"),
    (lambda x, i: (torch.zeros(17, 256, dtype=torch.bfloat16), torch.zeros(17, 2, dtype=torch.int64)), "exceed"),
])
def test_dispatch_rejects_bad_inputs(cpu_buffer, change, match):
    x, idx = change(*_inputs())
    with pytest.raises((TypeError, ValueError), match=match):
        cpu_buffer.low_latency_dispatch(x, idx, 16, 8)


@pytest.mark.parametrize("change", [lambda i: i + 8, lambda i: i - 2])
def test_dispatch_checks_ids_on_the_host_at_level_2(cpu_buffer, monkeypatch, change):
    # at the default level 1 the kernel drops and counts them (tests/test_low_latency_gpu.py)
    monkeypatch.setenv("EPKERN_CHECK_VALUES", "2")
    x, idx = _inputs()
    with pytest.raises(ValueError, match="out of range"):
        cpu_buffer.low_latency_dispatch(x, change(idx), 16, 8)


def test_dispatch_rejects_bad_options(cpu_buffer):
    x, idx = _inputs()
    with pytest.raises(ValueError, match="round_scale"):
        cpu_buffer.low_latency_dispatch(x, idx, 16, 8, use_ue8m0=True)
    with pytest.raises(ValueError, match="return_recv_hook"):
        cpu_buffer.low_latency_dispatch(x, idx, 16, 8, async_finish=True, return_recv_hook=True)
    with pytest.raises(ValueError, match="divisible"):
        cpu_buffer.low_latency_dispatch(x, idx, 16, 7)
    with pytest.raises(ValueError, match="too small"):
        cpu_buffer.low_latency_dispatch(x, idx, 17, 8)
    with pytest.raises(ValueError, match="cumulative_local_expert_recv_stats"):
        cpu_buffer.low_latency_dispatch(x, idx, 16, 8, cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32))


def test_combine_rejects_bad_inputs(cpu_buffer):
    _, idx = _inputs()

    def handle(token_rows=None):
        return LowLatencyHandle(torch.zeros(4, 32, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int64), 16, 256,
                                8, token_rows=torch.zeros(2, 16, 2, dtype=torch.int32) if token_rows is None else token_rows,
                                recv_tokens=torch.zeros(2, dtype=torch.int32))
    x = torch.zeros(4, 32, 256, dtype=torch.bfloat16)
    w = torch.ones(4, 2)
    with pytest.raises(TypeError, match="handle"):
        cpu_buffer.low_latency_combine(x, idx, w, handle()[:4])
    with pytest.raises(ValueError, match="x: dimension 1"):
        cpu_buffer.low_latency_combine(x[:, :16].contiguous(), idx, w, handle())
    with pytest.raises(TypeError, match="topk_weights"):
        cpu_buffer.low_latency_combine(x, idx, w.double(), handle())
    with pytest.raises(ValueError, match="out"):
        cpu_buffer.low_latency_combine(x, idx, w, handle(), out=torch.zeros(3, 256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="columns"):
        cpu_buffer.low_latency_combine(x, torch.zeros(4, 3, dtype=torch.int64), torch.ones(4, 3), handle())
    with pytest.raises(ValueError, match="token_rows"):
        cpu_buffer.low_latency_combine(x, idx, w, handle(torch.zeros(2, 8, 2, dtype=torch.int32)))


def test_mask_arguments_are_checked(cpu_buffer):
    with pytest.raises(ValueError, match="rank_to_mask"):
        cpu_buffer.low_latency_update_mask_buffer(2, True)
    cpu_buffer.low_latency_update_mask_buffer(1, True)
    assert cpu_buffer.mask.tolist() == [0, 1]
    cpu_buffer.low_latency_clean_mask_buffer()
    assert cpu_buffer.mask.tolist() == [0, 0]


# -- output sets: two per output signature, in turn (DeepEP: at most two results held) -----------------
class _Launcher:
    def __init__(self, calls):
        self.calls = calls

    def launcher(self, entry, grid, block, codes, smem=0, cooperative=False):
        def launch(stream, *values):
            self.calls.append(entry)
        return launch


@pytest.fixture
def planned_buffer(cpu_buffer, monkeypatch):
    from epkern import errors
    from epkern.low_latency import kernels as llk
    from epkern.low_latency import plans

    calls = []
    monkeypatch.setattr(llk, "get_module", lambda spec, device=None: _Launcher(calls))
    monkeypatch.setattr(plans, "current_stream_handle", lambda device: 0)
    monkeypatch.setattr(errors, "site", lambda device, name: (0x1000, 0x2000))
    buf = cpu_buffer
    buf._dispatch_plans, buf._combine_plans, buf._rings = {}, {}, {}
    buf.timeout_ns = 10
    buf.peer = type("Peer", (), {"ptr_table": torch.zeros(2, dtype=torch.int64), "local_ptr": 1 << 40})()
    buf.epochs, buf.tickets = torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    buf.calls = calls
    return buf


def test_outputs_alternate_between_two_sets_per_output_signature(planned_buffer):
    buf = planned_buffer
    x, idx = _inputs()
    first, second, third = (buf.low_latency_dispatch(x, idx, 16, 8) for _ in range(3))
    assert buf.calls == ["send_recv"] * 3
    # recv_x, recv_count and the handle of the third call are the first call's; the second's are its own
    assert first[0][0] is third[0][0] and first[1] is third[1] and first[2] is third[2]
    assert second[0][0].data_ptr() != first[0][0].data_ptr() and second[2] is not first[2]
    assert first[0][1].stride() == (2 * 32, 1, 32)   # the scales keep DeepEP's column-major layout
    # another token count returns the same [L, R*M, H] outputs: it takes the next set of the same pair
    x3, idx3 = _inputs(tokens=3)
    assert buf.low_latency_dispatch(x3, idx3, 16, 8)[2] is second[2]
    # another output signature (bf16 rows) has sets of its own
    bf16 = buf.low_latency_dispatch(x, idx, 16, 8, use_fp8=False)
    assert bf16[0].dtype == torch.bfloat16 and bf16[2] is not first[2] and bf16[2] is not second[2]

    handle = first[2]
    y = torch.zeros(4, 32, 256, dtype=torch.bfloat16)
    w = torch.ones(4, 2)
    c1, c2, c3 = (buf.low_latency_combine(y, idx, w, handle)[0] for _ in range(3))
    assert c1 is c3 and c2 is not c1 and c1.shape == (4, 256)
    out = torch.empty(4, 256, dtype=torch.bfloat16)
    assert buf.low_latency_combine(y, idx, w, handle, out=out)[0] is out


def test_a_buffer_keeps_the_sets_of_its_last_signatures(planned_buffer, monkeypatch):
    from epkern.low_latency import buffer as llb

    monkeypatch.setattr(llb, "_RING_LIMIT", 2)
    buf = planned_buffer
    x, idx = _inputs()
    kept = buf.low_latency_dispatch(x, idx, 16, 8)
    buf.low_latency_dispatch(x, idx, 16, 8, use_fp8=False)
    buf.low_latency_dispatch(x, idx, 8, 8)          # a third output signature: the first one's sets go
    assert len(buf._rings) == 2
    again = buf.low_latency_dispatch(x, idx, 16, 8)
    assert again[2] is not kept[2] and kept[0][0].shape == again[0][0].shape   # the result held stays the caller's
