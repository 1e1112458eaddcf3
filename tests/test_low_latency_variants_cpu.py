"""Low-latency variants without a GPU: weights carried by dispatch, LogFMT combine, hidden sizes that are
not a multiple of 128 (bf16 rows of any multiple of 16 bytes). Templates compile (NVRTC, sm_90a),
sizes, and the argument checks that run before any launch."""
import pytest
import torch

from epkern.codegen import build
from epkern.deployment import Deployment
from epkern.low_latency import logfmt
from epkern.low_latency.buffer import LowLatencyBuffer, get_low_latency_rdma_size_hint
from epkern.low_latency.handle import LowLatencyHandle
from epkern.low_latency.kernels import (DISPATCH_KINDS, PARAMS, BufferLayout, LowLatencySpec, deployment_specs,
                                        header_bytes)


def _compiles(spec: LowLatencySpec) -> None:
    cubin = build(spec, "sm_90a").cubin
    for entry in ("send", "recv", "send_recv"):
        assert f"{spec.symbol}_{entry}".encode() in cubin, f"{spec.name}: no entry point {entry}"


# -- templates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,hidden,num_ranks,num_experts,num_topk,carry", [
    ("bf16", 7168, 8, 256, 8, True),
    ("fp8", 7168, 2, 256, 8, True),
    ("fp8_ue8m0", 2944, 4, 128, 32, True),    # top-32 with weights: the largest header (384 bytes)
    ("fp8_round", 128, 2, 2, 1, True),
    ("bf16", 2880, 4, 32, 8, False),          # GPT-OSS: 22.5 groups of 128
    ("bf16", 2880, 2, 32, 4, True),
    ("bf16", 1000, 2, 8, 3, False),           # 125 16-byte vectors: odd everything
    ("bf16", 8, 2, 2, 1, True),
])
def test_dispatch_variants_compile(kind, hidden, num_ranks, num_experts, num_topk, carry):
    _compiles(LowLatencySpec(kind, hidden, num_ranks, num_experts, num_topk, carry_weights=carry))


@pytest.mark.parametrize("kind", ["combine", "combine_logfmt"])
@pytest.mark.parametrize("hidden,num_ranks,num_experts,num_topk", [
    (7168, 8, 256, 8), (2880, 2, 32, 8), (1000, 4, 16, 32), (128, 2, 2, 1), (8, 2, 2, 1),
])
def test_combine_variants_compile(kind, hidden, num_ranks, num_experts, num_topk):
    _compiles(LowLatencySpec(kind, hidden, num_ranks, num_experts, num_topk))


def test_rendered_switches():
    logfmt_src = LowLatencySpec("combine_logfmt", 2880, 2, 32, 8).render()
    assert "epk_logfmt_encode8" in logfmt_src and "constexpr int LOGFMT_META_BYTES = 96;" in logfmt_src
    assert "epk_logfmt" not in LowLatencySpec("combine", 2880, 2, 32, 8).render()
    carry = LowLatencySpec("bf16", 7168, 2, 256, 8, carry_weights=True).render()
    assert "constexpr bool CARRY_WEIGHTS = true;" in carry and "constexpr int HEADER_BYTES = 96;" in carry
    plain = LowLatencySpec("bf16", 7168, 2, 256, 8).render()
    assert "constexpr bool CARRY_WEIGHTS = false;" in plain and "constexpr int HEADER_BYTES = 64;" in plain


def test_names_say_the_variant():
    a = LowLatencySpec("fp8", 7168, 8, 256, 8)
    b = LowLatencySpec("fp8", 7168, 8, 256, 8, carry_weights=True)
    c = LowLatencySpec("combine_logfmt", 7168, 8, 256, 8)
    assert a.name != b.name and b.symbol.endswith("_w") and "combine_logfmt" in c.symbol
    assert a.symbol == "low_latency_fp8_h7168_r8_e256_k8"   # unchanged for the DeepEP path


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="fp8", hidden=2880), "multiple of 128"),
    (dict(kind="fp8_ue8m0", hidden=1000), "multiple of 128"),
    (dict(kind="bf16", hidden=2884), "multiple of 8"),
    (dict(kind="combine_logfmt", hidden=4), "hidden"),
    (dict(kind="combine", carry_weights=True), "carry_weights"),
    (dict(kind="combine_logfmt", carry_weights=True), "carry_weights"),
])
def test_spec_rejects_bad_variants(kwargs, match):
    fields = dict(kind="bf16", hidden=7168, num_ranks=8, num_experts=256, num_topk=8) | kwargs
    with pytest.raises(ValueError, match=match):
        LowLatencySpec(**fields)


# -- sizes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_topk,extra", [(1, 0), (4, 16), (8, 32), (9, 32), (32, 128)])
def test_extra_bytes_per_message(num_topk, extra):
    """Carried weights add K fp32 to the header (padded to 16 bytes): 32 bytes at top-8."""
    for kind in DISPATCH_KINDS:
        plain = LowLatencySpec(kind, 7168, 2, 256, num_topk)
        carry = LowLatencySpec(kind, 7168, 2, 256, num_topk, carry_weights=True)
        assert carry.message_bytes - plain.message_bytes == extra
        assert carry.header_bytes == header_bytes(num_topk, carry_weights=True) == 16 * -(-12 * num_topk // 16)


def test_size_hint_formula():
    M, H, E = 128, 7168, 256
    for R in (2, 8):
        hint = get_low_latency_rdma_size_hint(M, H, R, E)
        # barrier + 2 x (flags, counts, top-32 weights, a dispatch slot per (rank, token) holding the
        # largest message (top-32 header with weights, bf16 row), a combine slot per (rank, token)
        # (LogFMT meta + bf16 row), zero-copy send rows)
        assert hint == 256 + 2 * (128 * -(-24 * R // 128) + 1024 + 128 * R * M + R * M * (384 + 2 * H)
                                  + R * M * (logfmt.meta_bytes(H) + 2 * H) + E * M * 2 * H)
    assert get_low_latency_rdma_size_hint(M, 2880, 2, 32) > 0   # any hidden % 8 == 0


def test_combine_region_is_its_own():
    """Combine rows land apart from dispatch messages, so a combine sent before a slow peer has read its
    dispatch messages cannot overwrite them."""
    for hidden in (2880, 7168):
        lay = BufferLayout(33, hidden, 4, 72)
        spans = []
        for idx in (0, 1):
            spans += [(lay.flags(idx), lay.flags_bytes), (lay.counts(idx), lay.counts_bytes),
                      (lay.weights(idx), lay.weights_bytes), (lay.recv(idx), lay.recv_bytes),
                      (lay.combine_recv(idx), lay.combine_recv_bytes), (lay.send(idx), lay.send_bytes)]
        spans.sort()
        for (a, n), (b, _) in zip(spans, spans[1:]):
            assert a + n <= b and b % 16 == 0
        assert spans[-1][0] + spans[-1][1] <= lay.total_bytes
        assert lay.combine_recv_bytes >= 4 * 33 * logfmt.message_bytes(hidden)


def test_deployment_specs_cover_the_variants():
    specs = [s for s in deployment_specs(Deployment()) if isinstance(s, LowLatencySpec)]
    got = {(s.num_ranks, s.kind, s.carry_weights) for s in specs}
    want = {(r, k, c) for r in (2, 4, 8) for k in DISPATCH_KINDS for c in (False, True)}
    want |= {(r, k, False) for r in (2, 4, 8) for k in ("combine", "combine_logfmt")}
    assert got == want
    odd = [s for s in deployment_specs(Deployment(hidden=2880)) if isinstance(s, LowLatencySpec)]
    assert odd and {s.kind for s in odd} == {"bf16", "combine", "combine_logfmt"}


# -- argument checks (before any launch; the buffer here has no peer memory) ---------------------------
@pytest.fixture
def cpu_buffer():
    buf = LowLatencyBuffer.__new__(LowLatencyBuffer)
    buf.rank, buf.num_ranks, buf.num_sms, buf.buffer_idx = 0, 2, 32, 0
    buf.device = torch.device("cpu")
    buf.num_bytes = get_low_latency_rdma_size_hint(16, 256, 2, 8)
    buf.mask = torch.zeros(2, dtype=torch.int32)
    return buf


def _handle(weights=None, hidden=256):
    return LowLatencyHandle(torch.zeros(4, 32, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int64), 16, hidden, 8,
                            token_rows=torch.zeros(2, 16, 2, dtype=torch.int32),
                            recv_tokens=torch.zeros(2, dtype=torch.int32), token_weights=weights)


def test_dispatch_checks_topk_weights(cpu_buffer):
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="topk_weights"):
        cpu_buffer.low_latency_dispatch(x, idx, 16, 8, topk_weights=torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="topk_weights"):
        cpu_buffer.low_latency_dispatch(x, idx, 16, 8, topk_weights=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="multiple of 128"):
        cpu_buffer.low_latency_dispatch(torch.zeros(4, 200, dtype=torch.bfloat16), idx, 16, 8, use_fp8=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_buffer.low_latency_dispatch(torch.zeros(4, 252, dtype=torch.bfloat16), idx, 16, 8, use_fp8=False)


def test_combine_checks_handle_and_weights(cpu_buffer):
    x = torch.zeros(4, 32, 256, dtype=torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    w = torch.ones(4, 2)
    with pytest.raises(TypeError, match="plain 5-tuple"):
        cpu_buffer.low_latency_combine(x, idx, w, tuple(_handle()))
    with pytest.raises(TypeError, match="plain 7-tuple"):
        h = _handle()
        cpu_buffer.low_latency_combine(x, idx, w, tuple(h) + (h.token_rows, h.recv_tokens))
    with pytest.raises(ValueError, match="topk_weights"):
        cpu_buffer.low_latency_combine(x, idx, None, _handle())          # nothing carried, nothing given
    with pytest.raises(ValueError, match="token_weights"):
        cpu_buffer.low_latency_combine(x, idx, w, _handle(torch.zeros(2, 16, 3)))
    with pytest.raises(TypeError, match="plain"):
        cpu_buffer.get_next_low_latency_combine_buffer(tuple(_handle()))


@pytest.mark.parametrize("spec", [
    LowLatencySpec("bf16", 2880, 2, 32, 8, carry_weights=True),
    LowLatencySpec("fp8_ue8m0", 7168, 8, 256, 8, carry_weights=True),
    LowLatencySpec("combine_logfmt", 2880, 2, 32, 8),
], ids=lambda s: s.symbol)
def test_variant_signatures_match_the_declared_parameters(spec):
    from test_kernel_params import kernel_signatures

    params = PARAMS["combine" if spec.is_combine else "dispatch"]
    kernels = kernel_signatures(spec.render())
    for p in params:
        template = kernels[f"{spec.symbol}_{p.entry}"]
        assert [n for n, _ in template] == list(p.names), f"{p.entry}: parameter names or order differ"
