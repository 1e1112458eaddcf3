"""The NVLink kernel family on CPU: specs validate and name themselves, every rank count from 2 to
8 renders and compiles with NVRTC (sm_90a), shapes DeepEP refuses compile too, and the peer-buffer
layout math holds the rows it promises."""
import dataclasses

import pytest

from epkern.normal import kernels as ik
from epkern.codegen import build
from epkern.deployment import Deployment


@pytest.mark.parametrize("num_ranks", range(2, 9))
def test_every_rank_count_compiles(num_ranks):
    specs = [ik.notify_spec(num_ranks), ik.dispatch_spec(num_ranks, 7168, 8, False, 24),
             ik.dispatch_spec(num_ranks, 7168, 8, True, 24), ik.combine_spec(num_ranks, 7168, 8, 24)]
    for spec in specs:
        source = spec.render()
        assert f"{spec.symbol}_{spec.kernel}" in source
        assert "{{" not in source and "{%" not in source
        assert len(build(spec, "sm_90a").cubin) > 1000


@pytest.mark.parametrize("kernel,hidden,topk,fp8", [
    ("dispatch", 2880, 1, False),   # gpt-oss hidden, top-1
    ("dispatch", 4096, 32, True),   # top-32
    ("dispatch", 3584, 0, False),   # no top-k
    ("combine", 5120, 16, False),
    ("combine", 2880, 0, False),
])
def test_shapes_deepep_refuses_compile(kernel, hidden, topk, fp8):
    spec = (ik.dispatch_spec(8, hidden, topk, fp8, 20) if kernel == "dispatch"
            else ik.combine_spec(8, hidden, topk, 20))
    assert len(build(spec, "sm_90a").cubin) > 1000


def test_specs_validate_and_name_themselves():
    spec = ik.dispatch_spec(2, 7168, 8, True, 24)
    assert spec.name.startswith("intranode_dispatch_fp8_h7168_r2_k8_s24_")
    assert ik.combine_spec(4, 4096, 8, 16).symbol == "intranode_combine_h4096_r4_k8_s16_w8x24"
    assert ik.notify_spec(8).symbol == "intranode_notify_r8"
    # token counts are run-time arguments, never specialization fields
    assert not any("token" in f.name for f in dataclasses.fields(ik.IntranodeSpec))
    with pytest.raises(ValueError, match="hidden"):
        ik.dispatch_spec(2, 2880, 8, True, 24)          # FP8 needs a multiple of 128
    with pytest.raises(ValueError, match="hidden"):
        ik.dispatch_spec(2, 100, 8, False, 24)           # bf16 needs a multiple of 8
    with pytest.raises(ValueError, match="num_topk"):
        ik.dispatch_spec(2, 7168, 33, False, 24)
    with pytest.raises(ValueError, match="num_ranks"):
        ik.notify_spec(9)
    with pytest.raises(ValueError, match="num_sms"):
        ik.combine_spec(2, 7168, 8, 200)
    with pytest.raises(ValueError, match="dtype"):
        ik.IntranodeSpec("combine", 2, 7168, 8, "fp8", 24, 12, 12)
    with pytest.raises(ValueError, match="notify"):
        ik.IntranodeSpec("notify", 2, hidden=7168)


@pytest.mark.parametrize("nbytes", [3 << 20, 1 << 30, int(1e9) + 12345])
def test_peer_layout_holds_what_it_promises(nbytes):
    layout = ik.PeerLayout(nbytes)
    for slot in (ik.dispatch_slot_bytes(7168, 8, False), ik.dispatch_slot_bytes(7168, 8, True),
                 ik.combine_slot_bytes(7168, 8), ik.dispatch_slot_bytes(8, 0, False)):
        cap = layout.slot_capacity(slot)
        assert layout.payload_off + cap * slot <= nbytes
        assert cap <= layout.flag_capacity
        assert layout.flags_off + layout.flag_capacity * 4 <= layout.payload_off
        # the size a user is told to allocate really holds that many rows
        for rows in (1, 1000, 8 * 4096):
            assert ik.PeerLayout(ik.required_bytes(rows, slot)).slot_capacity(slot) >= rows


def test_deployment_specs_cover_every_ep_size():
    specs = ik.deployment_specs(Deployment(hidden=7168, num_experts=256, num_topk=8, ep_sizes=(2, 4, 8, 16)))
    kinds = {(s.kernel, s.num_ranks) for s in specs}
    assert {("notify", r) for r in (2, 4, 8)} <= kinds
    assert all(s.num_ranks <= 8 for s in specs)   # NVLink stops at one node of 8
    assert {s.dtype for s in specs if s.kernel == "dispatch"} == {"bf16", "fp8"}


def test_combine_sender_stages_must_fit_shared_memory():
    assert ik.combine_spec(2, 7168, 8, 24).dynamic_smem == 8 * ik.COMBINE_STAGES * 8192
    assert ik.IntranodeSpec("combine", 2, 8, 8, "bf16", 24, 8, 24).dynamic_smem == 8 * ik.COMBINE_STAGES * 16
    with pytest.raises(ValueError, match="shared memory"):
        ik.IntranodeSpec("combine", 2, 7168, 8, "bf16", 24, 16, 8)
