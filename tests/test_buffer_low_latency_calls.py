"""Buffer.low_latency_dispatch / combine go straight to the low-latency engine (no forwarding frame):
the engines' methods must take Buffer's parameters, in the same order with the same defaults."""
import inspect

import pytest
import torch

import epkern
from epkern.bench.local import group_of_one
from epkern.internode.low_latency import CollectiveLowLatency
from epkern.low_latency.buffer import LowLatencyBuffer


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()][1:]  # after self


@pytest.mark.parametrize("engine", [LowLatencyBuffer, CollectiveLowLatency])
@pytest.mark.parametrize("name", ["low_latency_dispatch", "low_latency_combine"])
def test_engines_take_buffers_parameters(engine, name):
    assert _params(getattr(engine, name)) == _params(getattr(epkern.Buffer, name))


def test_calls_reach_the_engine_and_are_refused_after_destroy():
    with group_of_one() as group:
        buffer = epkern.Buffer(group, num_rdma_bytes=1 << 20, low_latency_mode=True, timeout_s=5.0)
        engine = buffer._low_latency
        assert buffer.low_latency_dispatch.__self__ is engine and buffer.low_latency_combine.__self__ is engine
        x = torch.randn(2, 128, dtype=torch.bfloat16)
        topk_idx = torch.tensor([[0, 1], [2, -1]])
        weights = torch.rand(2, 2)
        recv, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, 4, 4, use_fp8=False)
        assert count.tolist() == [1, 1, 1, 0]
        combined, _, _ = buffer.low_latency_combine(recv, topk_idx, weights, handle)
        assert combined.shape == x.shape
        buffer.destroy()
        assert "low_latency_dispatch" not in vars(buffer)
        with pytest.raises(RuntimeError, match="low_latency_mode"):
            buffer.low_latency_dispatch(x, topk_idx, 4, 4, use_fp8=False)
        with pytest.raises(RuntimeError, match="low_latency_mode"):
            buffer.low_latency_combine(recv, topk_idx, weights, handle)
