"""Stream ordering by raw handles, for the per-call path: one event record and one wait through the driver.

torch's `a.wait_stream(b)` makes a new Event and goes through several Python layers (about 10 us
of host time on an H200 host, `with torch.cuda.stream(s)` about 20 us); a Buffer call orders its
communication stream after the current one and back, so it pays that twice per call. StreamOrder
keeps one CUevent (timing off) and calls cuEventRecord + cuStreamWaitEvent (cuda.bindings) on raw
stream handles. Reusing the event is safe: a wait takes the event's state when it is enqueued.
Works the same under CUDA-graph capture (record and wait become the graph's dependency edges).
"""
from __future__ import annotations

import threading

from epkern.codegen.launch import _cu_stream


class StreamOrder:
    """`wait(waiter, signaler)`: work enqueued on stream `waiter` from now on runs after everything
    enqueued on `signaler` so far. `wait_event(waiter, event)`: after a recorded torch.cuda.Event."""

    def __init__(self, device: int):
        from cuda.bindings import driver

        from epkern.codegen.runtime import ensure_context

        ensure_context(device)
        err, self._event = driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        _check(err, "cuEventCreate")
        self._record, self._wait, self._cu_event = driver.cuEventRecord, driver.cuStreamWaitEvent, driver.CUevent
        self._lock = threading.Lock()

    def wait(self, waiter: int, signaler: int) -> None:
        with self._lock:
            (err,) = self._record(self._event, _cu_stream(signaler))
            _check(err, "cuEventRecord")
            (err,) = self._wait(_cu_stream(waiter), self._event, 0)
        _check(err, "cuStreamWaitEvent")

    def wait_event(self, waiter: int, event) -> None:
        handle = event.cuda_event
        if not handle:  # never recorded: nothing to wait for (as torch's wait_event)
            return
        (err,) = self._wait(_cu_stream(waiter), self._cu_event(handle), 0)
        _check(err, "cuStreamWaitEvent")

    def close(self) -> None:
        from cuda.bindings import driver

        if self._event is not None:
            driver.cuEventDestroy(self._event)
            self._event = None


def _check(err, what: str) -> None:
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
