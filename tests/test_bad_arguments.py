"""Bad arguments found by probing (issue 18 items 6 and 7): each is a clear error before any work."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from epkern import Config, fp8, get_low_latency_rdma_size_hint
from epkern.codegen import KernelSpec, knobs
from epkern.layout import get_dispatch_layout


# -- item 6: timeouts and sizes --------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e30", "0", "-2", "ten"])
def test_bad_peer_timeout_knob_is_rejected(monkeypatch, raw):
    monkeypatch.setenv("EPKERN_TIMEOUT_S", raw)
    with pytest.raises(ValueError, match=r"EPKERN_TIMEOUT_S="):
        knobs.peer_timeout_s()


def test_good_peer_timeout_knob(monkeypatch):
    monkeypatch.setenv("EPKERN_TIMEOUT_S", "86400")
    assert knobs.peer_timeout_s() == 86400.0
    monkeypatch.setenv("EPKERN_TIMEOUT_S", "0.5")
    assert knobs.peer_timeout_s() == 0.5


def test_knobs_read_on_every_call_follow_the_environment(monkeypatch):
    """raw_env (EPKERN_CHECK_VALUES, EPKERN_TUNED_CONFIG on the per-call paths) sees every change."""
    from epkern.errors import check_level

    monkeypatch.delenv("EPKERN_CHECK_VALUES", raising=False)
    assert knobs.raw_env("EPKERN_CHECK_VALUES") is None and check_level() == 1
    for raw, level in (("0", 0), ("2", 2), (" 1 ", 1)):
        monkeypatch.setenv("EPKERN_CHECK_VALUES", raw)
        assert knobs.raw_env("EPKERN_CHECK_VALUES") in (raw, os.fsencode(raw)) and check_level() == level
    monkeypatch.setenv("EPKERN_CHECK_VALUES", "3")
    with pytest.raises(ValueError, match="EPKERN_CHECK_VALUES='3'"):
        check_level()
    monkeypatch.delenv("EPKERN_CHECK_VALUES")
    assert check_level() == 1


@pytest.fixture(scope="module")
def world_of_one():
    with tempfile.TemporaryDirectory() as tmp:
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        yield dist.group.WORLD
        if owned:
            dist.destroy_process_group()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(timeout_s=-1), ValueError, r"timeout_s=-1.0: expected a finite number of seconds in \(0, 86400\]"),
    (dict(timeout_s=float("nan")), ValueError, r"timeout_s=nan"),
    (dict(timeout_s=float("inf")), ValueError, r"timeout_s=inf"),
    (dict(timeout_s=1e30), ValueError, r"timeout_s=1e\+30"),
    (dict(timeout_s="5"), TypeError, r"timeout_s='5': expected a number of seconds"),
    (dict(num_nvl_bytes=-5), ValueError, r"num_nvl_bytes=-5: expected an int >= 0"),
    (dict(num_rdma_bytes=-1), ValueError, r"num_rdma_bytes=-1: expected an int >= 0"),
    (dict(num_nvl_bytes=1.5e9), ValueError, r"num_nvl_bytes=1500000000.0: expected an int"),
])
def test_buffer_rejects_bad_timeouts_and_sizes(world_of_one, kwargs, error, match):
    from epkern import Buffer

    with pytest.raises(error, match=match):
        Buffer(world_of_one, backend="torch", **kwargs)


def test_buffer_accepts_a_good_timeout(world_of_one):
    from epkern import Buffer

    assert Buffer(world_of_one, backend="torch", timeout_s=3).timeout_s == 3.0


# -- item 7: validation before NVRTC, allocation or long loops -------------------------------------
def test_float_group_size_is_rejected_before_nvrtc():
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"group_size=128.0: allowed values are \[32, 64, 128\]"):
        fp8.per_token_cast_to_fp8(x, group_size=128.0)
    with pytest.raises(ValueError, match=r"Fp8CastSpec.group_size=128.0: allowed values"):
        fp8.Fp8CastSpec(hidden=256, group_size=128.0)
    with pytest.raises(ValueError, match=r"group_size=True"):
        fp8.per_token_cast_to_fp8(x, group_size=True)


def test_the_abstract_spec_says_what_to_do():
    with pytest.raises(NotImplementedError, match="KernelSpec is the abstract base of kernel specs"):
        KernelSpec()


def test_huge_num_experts_on_the_cpu_layout_fails_at_once():
    topk = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"num_experts=1000000000000: at most 65536"):
        get_dispatch_layout(topk, 10**12, 8)


def test_size_hints_reject_absurd_token_counts():
    with pytest.raises(ValueError, match=r"token slots \(num_max_tokens x num_ranks\)"):
        Config().get_nvl_buffer_size_hint(7168 * 2, 8, num_max_tokens=10**12)
    with pytest.raises(ValueError, match=r"num_max_dispatch_tokens_per_rank=1000000000: expected an int in \[1, 1048576\]"):
        get_low_latency_rdma_size_hint(10**9, 7168, 8, 256)
    from epkern import max_dispatch_tokens_for_bytes
    assert max_dispatch_tokens_for_bytes(1 << 62, 128, 2, 2) == 1 << 20  # the inverse stops at the limit too
    assert get_low_latency_rdma_size_hint(128, 7168, 8, 256) > 0
