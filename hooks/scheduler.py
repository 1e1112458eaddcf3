"""Overlap the communication of one micro-batch with the computation of the others.

A micro-batch is a generator written as stages. After issuing a send whose receive can wait, it
yields the pending receive and the scheduler switches to the next micro-batch; the receive is
completed only when the scheduler comes back, just before the micro-batch resumes. Two kinds:

* decode (low-latency): the receive hook of `low_latency_dispatch/combine(..., return_recv_hook=True)`.
  The send kernel returns at once; nothing spins while the data is in flight; the hook launches
  the receive kernel. Everything is on one stream with no host sync, so the whole overlapped step
  can be captured into one CUDA graph.
* prefill (normal mode): the `EventOverlap` of `dispatch/combine(..., async_finish=True,
  previous_event=..., allocate_on_comm_stream=True)`. The call runs on the buffer's communication
  stream; resuming makes the compute stream wait for the event (`current_stream_wait()`).

    def layer(x):
        ..., hook = buffer.low_latency_dispatch(x, ..., return_recv_hook=True)
        yield hook                       # <- the other micro-batches run here
        y = experts(...)
        out, _, hook = buffer.low_latency_combine(y, ..., return_recv_hook=True)
        yield hook
        return out

    outputs = run_overlapped([layer(x0), layer(x1)])      # overlap=False: one after the other

A stage may also yield None (hand over with nothing pending), a `torch.cuda.Event`, or
`Pending(obj, "label")` to name the receive in the profiler. NVTX ranges ("mb0 stage1",
"mb0 recv dispatch") mark every stage and receive (no-ops without CUDA).

Errors: yielding anything else is a TypeError; a receive hook yielded after it was already called
(or by two micro-batches) is a RuntimeError; when a micro-batch raises (in a stage or in its
receive), every other micro-batch is closed (`gen.close()`) and `MicroBatchError` is raised from
the original exception, naming the micro-batch and the stage. Pending receives of the closed
micro-batches are not completed: their sends were issued, so no peer waits on them; a peer that
waits for a send this rank never issues runs into the kernels' own timeout.
"""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable

import torch

MicroBatch = Generator[Any, None, Any]


class MicroBatchError(RuntimeError):
    """A micro-batch raised; `microbatch` and `stage` say where, `__cause__` holds the original."""

    def __init__(self, microbatch: int, stage: int, where: str, exc: BaseException):
        super().__init__(f"micro-batch {microbatch} failed in {where} {stage}: {type(exc).__name__}: {exc}")
        self.microbatch = microbatch
        self.stage = stage


@dataclass(frozen=True)
class Pending:
    """A pending receive with a label for the profiler: Pending(hook, "dispatch")."""

    receive: Any
    label: str = "recv"


def once(hook: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a receive hook so that a second call raises instead of receiving twice."""
    called = False

    def guarded():
        nonlocal called
        if called:
            raise RuntimeError("receive hook called twice: each hook completes one receive, once")
        called = True
        return hook()

    guarded.__wrapped__ = hook
    return guarded


# -- NVTX (a no-op on CPU builds and machines without CUDA) ----------------------------------------
_NVTX = torch.cuda.is_available()


@contextlib.contextmanager
def _nvtx(name: str):
    if not _NVTX:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


# -- pending receives -------------------------------------------------------------------------------
def _complete(pending) -> None:
    """Finish one receive: call a hook, or make the current stream wait for an event."""
    if callable(pending):
        pending()
    elif isinstance(pending, torch.cuda.Event):
        torch.cuda.current_stream().wait_event(pending)
    elif getattr(pending, "event", True) is not None:
        pending.current_stream_wait()
    # an EventOverlap without an event: the call finished synchronously (or on CPU), nothing to wait for


def _classify(index: int, stage: int, yielded) -> tuple[Any, str]:
    """(receive, label) of a yielded value, or TypeError naming the micro-batch."""
    label = f"recv {stage}"
    if isinstance(yielded, Pending):
        yielded, label = yielded.receive, yielded.label
    if yielded is None or callable(yielded) or isinstance(yielded, torch.cuda.Event) \
            or hasattr(yielded, "current_stream_wait"):
        return yielded, label
    raise TypeError(f"micro-batch {index} stage {stage} yielded {yielded!r}: yield a receive hook (callable), "
                    "an EventOverlap, a torch.cuda.Event, Pending(...) or None")


@dataclass
class _Slot:
    index: int
    gen: MicroBatch
    stage: int = 0
    pending: Any = None
    label: str = ""


@dataclass
class _Hooks:
    """Every hook seen in one run (kept alive so ids stay unique): called or still pending."""

    called: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)

    def add(self, slot: _Slot, hook) -> None:
        key = id(getattr(hook, "__wrapped__", hook))
        if key in self.called:
            raise RuntimeError(f"micro-batch {slot.index} stage {slot.stage} yielded a receive hook that was "
                               "already called: each hook completes one receive, once")
        if key in self.pending:
            raise RuntimeError(f"micro-batch {slot.index} stage {slot.stage} yielded a receive hook that "
                               f"micro-batch {self.pending[key][0]} is already waiting on")
        self.pending[key] = (slot.index, hook)

    def take(self, hook) -> None:
        key = id(getattr(hook, "__wrapped__", hook))
        self.called[key] = self.pending.pop(key)


def run(microbatches: Iterable[MicroBatch], *, overlap: bool = True, trace: list | None = None) -> list:
    """Run micro-batch generators; returns each one's return value, in input order.

    overlap=True: round-robin, each pending receive completed just before its micro-batch resumes
    (after every other micro-batch ran one stage). overlap=False: one micro-batch after the other,
    each receive completed at once (the same work in the same order per micro-batch, so the
    results are bit-identical). If `trace` is a list, ("run", i) / ("hook", i) events are appended
    to it ("hook": a pending receive of micro-batch i completed, hook or event).
    """
    slots = deque(_Slot(i, gen) for i, gen in enumerate(microbatches))
    for slot in slots:
        if not (hasattr(slot.gen, "send") and hasattr(slot.gen, "close")):
            raise TypeError(f"micro-batch {slot.index}: expected a generator, got {type(slot.gen).__name__}")
    results: dict[int, Any] = {}
    seen = _Hooks()
    slot = None
    try:
        while slots:
            slot = slots.popleft()
            if slot.pending is not None:
                _step(slot, "receive", lambda: _receive(slot, seen, trace))
            if trace is not None:
                trace.append(("run", slot.index))
            try:
                with _nvtx(f"mb{slot.index} stage{slot.stage}"):
                    yielded = _step(slot, "stage", lambda: next(slot.gen))
            except StopIteration as stop:
                results[slot.index] = stop.value
                continue
            slot.stage += 1
            try:
                slot.pending, slot.label = _classify(slot.index, slot.stage - 1, yielded)
                if callable(slot.pending):
                    seen.add(slot, slot.pending)
            except Exception:
                slot.gen.close()
                raise
            if overlap:
                slots.append(slot)
            else:
                slots.appendleft(slot)
            slot = None
    except BaseException:
        for other in ([slot] if slot is not None else []) + list(slots):
            with contextlib.suppress(Exception):
                other.gen.close()
        raise
    return [results[i] for i in sorted(results)]


def _receive(slot: _Slot, seen: _Hooks, trace) -> None:
    pending, slot.pending = slot.pending, None
    if callable(pending):
        seen.take(pending)
    if trace is not None:
        trace.append(("hook", slot.index))
    with _nvtx(f"mb{slot.index} {slot.label}"):
        _complete(pending)


def _step(slot: _Slot, where: str, fn):
    """Run fn for slot; an exception (other than StopIteration) closes the slot and names it."""
    try:
        return fn()
    except StopIteration:
        raise
    except Exception as exc:
        slot.gen.close()
        raise MicroBatchError(slot.index, slot.stage - (where == "receive"), where, exc) from exc


def run_overlapped(microbatches: Iterable[MicroBatch], trace: list | None = None) -> list:
    """run(microbatches, overlap=True): the original entry point."""
    return run(microbatches, overlap=True, trace=trace)


def run_serial(microbatches: Iterable[MicroBatch], trace: list | None = None) -> list:
    """run(microbatches, overlap=False): each micro-batch to completion, receives completed at once."""
    return run(microbatches, overlap=False, trace=trace)
