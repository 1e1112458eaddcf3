"""The cached-dispatch and combine plans (epkern/normal/plans.py) launch what NvlinkBackend itself launches.

Without a GPU: a stand-in backend with CPU tensors, every launch recorded by kernel parameter name.
The backend's own dispatch/combine (the first call of a signature, and every call the plans do not
take) and the plan's prepared launches must agree on every argument, round for round, except
the fresh outputs (new tensors each call) and recv_src_idx, which a cached dispatch leaves null.
"""
import types

import numpy as np
import pytest
import torch

from epkern.normal import kernels as ik
from epkern.call_plans import signature
from epkern.normal import plans
from epkern.normal.handle import DispatchHandle
from epkern.normal.nvlink import NvlinkBackend

R, RANK, T, H = 4, 1, 6, 256


class _Recorder:
    """get_module's stand-in: both launch paths record (entry, {parameter: value})."""

    def __init__(self):
        self.calls = []

    def _record(self, entry, values):
        params = ik.PARAMS[entry][0]
        assert len(values) == len(params.names)
        self.calls.append((entry, dict(zip(params.names, values))))

    def launch_values(self, entry, grid, block, codes, values, smem=0, stream=None):
        assert codes == ik.PARAMS[entry][0].codes
        self._record(entry, list(values))

    def launcher(self, entry, grid, block, codes, smem=0, cooperative=False):
        assert codes == ik.PARAMS[entry][0].codes
        return lambda stream, *values: self._record(entry, list(values))


def _backend(peer_bytes):
    backend = types.SimpleNamespace(
        rank=RANK, num_ranks=R, device=torch.device("cpu"), seq_word=torch.zeros(2, dtype=torch.int32),
        peer=types.SimpleNamespace(ptr_table=torch.zeros(R, dtype=torch.int64)), layout=ik.PeerLayout(peer_bytes),
        timeout_ns=10_000, status=types.SimpleNamespace(device_ptr=1 << 33), launches=0)
    backend._next_launch = lambda: setattr(backend, "launches", backend.launches + 1)
    return backend


def _handle(max_remote, max_tokens, rows=40):
    t = torch.zeros
    handle = DispatchHandle(t(R, R, dtype=torch.int32), t(R, 1, dtype=torch.int32), t(R, 1, dtype=torch.int32),
                            t(rows, dtype=torch.int32), t(T, R, dtype=torch.bool), t(T, R, dtype=torch.int32))
    handle.max_remote_rows, handle.max_tokens = max_remote, max_tokens
    return handle


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(ik, "get_module", lambda spec, device=None: rec)
    return rec


def _fresh(entry):
    return {"dispatch": ("recv_x", "recv_x_scales", "recv_src_idx"),
            "combine": ("combined_x", "combined_weights")}[entry]


def _compare(rec, n_backend):
    backend_calls, plan_calls = rec.calls[:n_backend], rec.calls[n_backend:]
    assert len(plan_calls) == len(backend_calls) >= 1
    for (entry, want), (entry2, got) in zip(backend_calls, plan_calls):
        assert entry == entry2
        for name in want:
            if name not in _fresh(entry):
                assert got[name] == want[name], (entry, name)
    return plan_calls


# peer buffers holding everything at once, and one small enough to stream in several rounds
@pytest.mark.parametrize("peer_bytes", [64 << 20, ik.MIN_PEER_BYTES])
@pytest.mark.parametrize("fp8", [False, True])
def test_cached_dispatch_plan_launches_as_the_backend(recorder, peer_bytes, fp8):
    backend = _backend(peer_bytes)
    handle = _handle(max_remote=5000, max_tokens=T)
    x = torch.zeros(T, H, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
    scales = torch.zeros(T, H // 128) if fp8 else None
    config = types.SimpleNamespace(num_sms=20)
    out = NvlinkBackend.dispatch(backend, x=x, x_scales=scales, topk_idx=None, topk_weights=None,
                                 num_tokens_per_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                                 expert_alignment=1, num_worst_tokens=0, handle=handle, config=config, stream=0)
    n = len(recorder.calls)
    assert plans.CachedDispatchPlan.takes(x, scales)
    plan = plans.CachedDispatchPlan(backend, x, scales, handle, config.num_sms)
    recv_x, recv_scales = plan(0, x, scales, handle)
    assert (plan.rounds.num_rounds > 1) == (peer_bytes == ik.MIN_PEER_BYTES)
    for _, got in _compare(recorder, n):
        assert got["recv_src_idx"] == 0 and got["recv_x"] == recv_x.data_ptr()
        assert got["recv_x_scales"] == (recv_scales.data_ptr() if fp8 else 0)
    assert recv_x.shape == out[0].shape and recv_x.dtype == x.dtype
    assert (recv_scales is None) == (out[1] is None)
    if fp8:
        assert recv_scales.shape == out[1].shape and recv_scales.dtype == scales.dtype
    assert backend.launches == 2 * plan.rounds.num_rounds


@pytest.mark.parametrize("peer_bytes", [64 << 20, ik.MIN_PEER_BYTES])
@pytest.mark.parametrize("num_topk,num_biases", [(0, 0), (8, 2)])
def test_combine_plan_launches_as_the_backend(recorder, peer_bytes, num_topk, num_biases):
    backend = _backend(peer_bytes)
    handle = _handle(max_remote=5000, max_tokens=5000)
    x = torch.zeros(40, H, dtype=torch.bfloat16)
    weights = torch.zeros(40, num_topk) if num_topk else None
    biases = tuple(torch.zeros(T, H, dtype=torch.bfloat16) for _ in range(num_biases))
    config = types.SimpleNamespace(num_sms=24)
    combined, combined_w = NvlinkBackend.combine(backend, x=x, handle=handle, topk_weights=weights, bias=biases,
                                                 config=config, stream=0)
    n = len(recorder.calls)
    plan = plans.CombinePlan(backend, x, handle, weights, biases, config.num_sms)
    got_x, got_w = plan(0, x, handle, weights, biases)
    assert (plan.rounds.num_rounds > 1) == (peer_bytes == ik.MIN_PEER_BYTES)
    for _, got in _compare(recorder, n):
        assert got["combined_x"] == got_x.data_ptr()
        assert got["combined_weights"] == (got_w.data_ptr() if num_topk else 0)
    assert got_x.shape == combined.shape and (got_w is None) == (combined_w is None)


def test_plans_take_only_payloads_that_need_no_fitting():
    x = torch.zeros(T, H, dtype=torch.bfloat16)
    q = torch.zeros(T, H, dtype=torch.float8_e4m3fn)
    assert plans.CachedDispatchPlan.takes(x, None)
    assert not plans.CachedDispatchPlan.takes(x[:, :128], None)                        # strided rows
    assert not plans.CachedDispatchPlan.takes(torch.zeros(T, H), None)                 # 4-byte rows: viewed as bf16
    assert plans.CachedDispatchPlan.takes(q, torch.zeros(T, 2))
    assert not plans.CachedDispatchPlan.takes(q, torch.zeros(2, T).t())                # column-major scales: copied
    assert not plans.CachedDispatchPlan.takes(q, torch.zeros(T, 1, dtype=torch.int32))  # UE8M0: packed into rows


def test_handle_key_needs_a_handle_with_host_known_maxima():
    handle = _handle(max_remote=5000, max_tokens=T)
    assert plans.handle_key(handle) is not None
    assert plans.handle_key(tuple(handle)) is None                     # a plain tuple: the backend's way
    assert plans.handle_key(_handle(max_remote=None, max_tokens=None)) is None
    assert plans.handle_key(_handle(30, T, rows=41)) != plans.handle_key(handle)
    assert signature(None) is None
    with pytest.raises(AttributeError):
        signature(np.zeros(2))
