"""The overlap scheduler: hooks run right before their micro-batch resumes, after the others ran."""
import pytest

from epkern.hooks import run_overlapped


def _microbatch(name, log, steps):
    for step in range(steps):
        log.append(f"{name}:send{step}")
        yield (lambda s=step: log.append(f"{name}:recv{s}"))
        log.append(f"{name}:compute{step}")
    return f"{name}-done"


def test_two_microbatches_interleave_send_compute_recv():
    log = []
    out = run_overlapped([_microbatch("a", log, 2), _microbatch("b", log, 2)])
    assert out == ["a-done", "b-done"]
    # a's first receive happens only after b issued its own send (a's data was in flight meanwhile)
    assert log.index("b:send0") < log.index("a:recv0") < log.index("a:compute0")
    assert log.index("a:send1") < log.index("b:recv1")
    # every hook ran exactly once, each before its own compute
    for name in "ab":
        for s in range(2):
            assert log.count(f"{name}:recv{s}") == 1
            assert log.index(f"{name}:recv{s}") < log.index(f"{name}:compute{s}")


def test_uneven_lengths_and_none_yields():
    def short():
        yield None
        return 1

    log = []
    trace = []
    assert run_overlapped([_microbatch("a", log, 3), short()], trace=trace) == ["a-done", 1]
    assert [e for e in trace if e[0] == "hook"] == [("hook", 0)] * 3


def test_bad_yield_and_bad_input():
    def bad():
        yield 42

    with pytest.raises(TypeError, match="yielded 42"):
        run_overlapped([bad()])
    with pytest.raises(TypeError, match="expected a generator"):
        run_overlapped([lambda: None])


# -- the scheduler's contract: events, serial order, errors -----------------------------------------
from epkern.events import EventOverlap
from epkern.hooks import MicroBatchError, Pending, once, run


class _Event(EventOverlap):
    """An EventOverlap whose wait is logged (no CUDA needed)."""

    def __init__(self, log, name):
        super().__init__(event=object())
        self.log, self.name = log, name

    def current_stream_wait(self):
        self.log.append(f"{self.name}:wait")


def _prefill(name, log):
    log.append(f"{name}:dispatch")
    yield Pending(_Event(log, f"{name}:d"), "dispatch")
    log.append(f"{name}:experts")
    yield _Event(log, f"{name}:c")
    return name


def test_events_and_serial_order():
    log = []
    assert run([_prefill("a", log), _prefill("b", log)]) == ["a", "b"]
    assert log == ["a:dispatch", "b:dispatch", "a:d:wait", "a:experts", "b:d:wait", "b:experts", "a:c:wait",
                   "b:c:wait"]
    log = []
    assert run([_prefill("a", log), _prefill("b", log)], overlap=False) == ["a", "b"]
    assert log == ["a:dispatch", "a:d:wait", "a:experts", "a:c:wait", "b:dispatch", "b:d:wait", "b:experts",
                   "b:c:wait"]
    # an EventOverlap without an event (a synchronous call) needs no wait
    def sync():
        yield EventOverlap(None)
        return 1
    assert run([sync(), sync()]) == [1, 1]


def _tracked(name, closed, pending):
    try:
        yield pending
        yield None
        return name
    finally:
        closed.append(name)


def test_a_raising_microbatch_closes_the_others():
    closed = []

    def failing():
        try:
            yield None
            raise ValueError("bad expert")
        finally:
            closed.append("f")

    with pytest.raises(MicroBatchError, match=r"micro-batch 1 failed in stage 1: ValueError: bad expert") as info:
        run([_tracked("a", closed, lambda: None), failing(), _tracked("c", closed, None)])
    assert info.value.microbatch == 1 and info.value.stage == 1
    assert isinstance(info.value.__cause__, ValueError)
    assert sorted(closed) == ["a", "c", "f"]

    def bad_hook():
        raise RuntimeError("peer timed out")

    closed = []
    with pytest.raises(MicroBatchError, match="micro-batch 0 failed in receive 0: RuntimeError: peer timed out"):
        run([_tracked("a", closed, bad_hook), _tracked("b", closed, None)])
    assert sorted(closed) == ["a", "b"]


def test_hook_errors():
    calls = []
    hook = once(lambda: calls.append(1))

    def twice():
        yield hook
        yield hook   # already called by the scheduler

    with pytest.raises(RuntimeError, match="already called"):
        run([twice()])
    assert calls == [1]
    with pytest.raises(RuntimeError, match="called twice"):
        hook()

    shared = lambda: None  # noqa: E731

    def waits_on(h):
        yield h

    with pytest.raises(RuntimeError, match="micro-batch 0 is already waiting"):
        run([waits_on(shared), waits_on(shared)])

    closed = []

    def bad():
        yield object()

    with pytest.raises(TypeError, match="micro-batch 1 stage 0 yielded <object"):
        run([_tracked("a", closed, None), bad()])
    assert closed == ["a"]
