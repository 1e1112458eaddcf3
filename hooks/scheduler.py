"""Overlap the communication of one micro-batch with the computation of another.

A micro-batch is written as a generator: it issues work and, right after a send whose receive
can wait (a low-latency dispatch/combine called with `return_recv_hook=True`), it yields the
receive hook. The scheduler then switches to the next micro-batch, and calls the hook only when
it comes back to the first one, just before resuming it — so the data was in flight while the
other micro-batch computed, and no SM was spent waiting:

    def layer(mb):
        recv_x, count, handle, _, hook = buffer.low_latency_dispatch(..., return_recv_hook=True)
        yield hook                       # <- other micro-batches run here
        y = experts(recv_x, count)
        out, _, hook = buffer.low_latency_combine(y, ..., return_recv_hook=True)
        yield hook
        return out

    outputs = run_overlapped([layer(mb0), layer(mb1)])

Yield `None` to hand over without a pending receive. A micro-batch's `return` value is its output.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable

MicroBatch = Generator[Callable[[], Any] | None, None, Any]


@dataclass
class _Slot:
    index: int
    gen: MicroBatch
    pending: Callable[[], Any] | None = None
    trace: list = field(default_factory=list)


def run_overlapped(microbatches: Iterable[MicroBatch], trace: list | None = None) -> list:
    """Run micro-batch generators round-robin; a yielded hook runs just before its owner resumes.

    Returns each micro-batch's return value, in input order. If `trace` is a list, the scheduler
    appends ("run", i) / ("hook", i) events to it, for tests and debugging.
    """
    slots = deque(_Slot(i, gen) for i, gen in enumerate(microbatches))
    results: dict[int, Any] = {}
    for slot in slots:
        if not hasattr(slot.gen, "send"):
            raise TypeError(f"micro-batch {slot.index}: expected a generator, got {type(slot.gen).__name__}")
    while slots:
        slot = slots.popleft()
        if slot.pending is not None:
            hook, slot.pending = slot.pending, None
            if trace is not None:
                trace.append(("hook", slot.index))
            hook()
        if trace is not None:
            trace.append(("run", slot.index))
        try:
            yielded = next(slot.gen)
        except StopIteration as stop:
            results[slot.index] = stop.value
            continue
        if yielded is not None and not callable(yielded):
            raise TypeError(f"micro-batch {slot.index} yielded {yielded!r}: yield a receive hook (callable) or None")
        slot.pending = yielded
        slots.append(slot)
    return [results[i] for i in sorted(results)]
