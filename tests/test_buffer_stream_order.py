"""Buffer._launch's stream order (CPU: raw stream handles and StreamOrder recorded, no GPU).

Every communication kernel of a Buffer must run after the ones issued before it (they share the peer
buffer and its sequence numbers) and after its inputs. DeepEP's order: the communication stream
waits for the current one, the kernel runs there, and a synchronous call makes the current stream
wait back. A synchronous call from the stream an eager synchronous call last waited on launches
there instead (the same order, without the two waits); every other call takes DeepEP's way, first
waiting for that stream when its own wait does not cover it.
"""
import types

import pytest
import torch

from epkern import buffer as B
from epkern.events import EventOverlap

COMM, MAIN, SIDE, CAPTURE = 100, 1, 2, 3


class _Order:
    """StreamOrder's stand-in: what was enqueued, in order."""

    def __init__(self, log, capturing):
        self.log, self.capturing = log, capturing

    def wait(self, waiter, signaler):
        self.log.append(("wait", waiter, signaler))

    def wait_event(self, waiter, event):
        self.log.append(("wait_event", waiter))

    def is_capturing(self, stream):
        return stream in self.capturing


@pytest.fixture
def buf(monkeypatch):
    state = types.SimpleNamespace(current=MAIN, log=[], capturing=set())
    monkeypatch.setattr(B, "current_stream_handle", lambda device: state.current)
    monkeypatch.setattr(B, "cuda_event", lambda event: event)
    b = object.__new__(B.Buffer)
    b._stream_calls, b._device_index, b._comm_handle, b._comm_tail = True, 0, COMM, COMM
    b._order = _Order(state.log, state.capturing)
    state.buffer = b
    return state


def _call(state, stream, **kw):
    """One synchronous (or, with kw, DeepEP-flagged) call from `stream`; the log it enqueued."""
    state.current = stream
    start = len(state.log)
    kw = {"previous_event": None, "async_finish": False, "allocate_on_comm_stream": False, **kw}
    result, event = state.buffer._launch(lambda s: state.log.append(("launch", s)) or (), (), **kw)
    assert isinstance(event, EventOverlap)
    return state.log[start:]


def test_repeated_synchronous_calls_launch_on_the_current_stream_without_waits(buf):
    assert _call(buf, MAIN) == [("wait", COMM, MAIN), ("launch", COMM), ("wait", MAIN, COMM)]
    assert _call(buf, MAIN) == [("launch", MAIN)]
    assert _call(buf, MAIN) == [("launch", MAIN)]


def test_a_call_from_another_stream_waits_for_the_direct_launches_first(buf):
    _call(buf, MAIN)
    _call(buf, MAIN)   # on MAIN: SIDE's call must come after it, and after SIDE's own work
    assert _call(buf, SIDE) == [("wait", COMM, MAIN), ("wait", COMM, SIDE), ("launch", COMM), ("wait", SIDE, COMM)]
    assert _call(buf, SIDE) == [("launch", SIDE)]
    assert _call(buf, MAIN) == [("wait", COMM, SIDE), ("wait", COMM, MAIN), ("launch", COMM), ("wait", MAIN, COMM)]


def test_asynchronous_calls_and_events_take_deep_eps_way(buf, monkeypatch):
    monkeypatch.setattr(EventOverlap, "record", staticmethod(lambda stream, extra_tensors=(): EventOverlap(None)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    buf.buffer._comm_stream = object()
    _call(buf, MAIN)
    _call(buf, MAIN)
    # async: runs on the communication stream after MAIN (its own wait covers the direct launch)
    assert _call(buf, MAIN, async_finish=True) == [("wait", COMM, MAIN), ("launch", COMM)]
    # the next synchronous call cannot launch on MAIN: MAIN never waited for the async kernel
    assert _call(buf, MAIN) == [("wait", COMM, MAIN), ("launch", COMM), ("wait", MAIN, COMM)]
    assert _call(buf, MAIN) == [("launch", MAIN)]
    # an event instead of the current stream: the direct launches on MAIN are waited for as well
    assert _call(buf, MAIN, previous_event=EventOverlap("ev")) == [
        ("wait", COMM, MAIN), ("wait_event", COMM), ("launch", COMM), ("wait", MAIN, COMM)]


def test_a_capturing_stream_never_becomes_the_tail(buf):
    _call(buf, MAIN)
    buf.capturing.add(CAPTURE)
    # the wait for MAIN comes first: eager, before the communication stream joins the capture
    assert _call(buf, CAPTURE) == [("wait", COMM, MAIN), ("wait", COMM, CAPTURE), ("launch", COMM),
                                   ("wait", CAPTURE, COMM)]
    assert _call(buf, CAPTURE) == [("wait", COMM, CAPTURE), ("launch", COMM), ("wait", CAPTURE, COMM)]  # DeepEP's
    buf.capturing.clear()
    # after the capture: the eager stream waits for the communication stream's eager work once more
    assert _call(buf, CAPTURE) == [("wait", COMM, CAPTURE), ("launch", COMM), ("wait", CAPTURE, COMM)]
    assert _call(buf, CAPTURE) == [("launch", CAPTURE)]


def test_a_stream_already_the_tail_captures_its_direct_launches(buf):
    _call(buf, MAIN)
    buf.capturing.add(MAIN)   # capture begins on the tail: its launches go into the graph, in order
    assert _call(buf, MAIN) == [("launch", MAIN)]


def test_allocate_on_comm_stream_without_async_is_refused_first(buf):
    _call(buf, MAIN)
    with pytest.raises(ValueError, match="allocate_on_comm_stream=True needs"):
        _call(buf, MAIN, allocate_on_comm_stream=True)
