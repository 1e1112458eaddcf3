"""Stream ordering by raw handles, for the per-call path: one event record and one wait through the driver.

torch's `a.wait_stream(b)` makes a new Event and goes through several Python layers (about 10 us
of host time on an H200 host, `with torch.cuda.stream(s)` about 20 us); a Buffer call orders its
communication stream after the current one and back, so it pays that twice per call. StreamOrder
keeps one CUevent (timing off) and calls cuEventRecord + cuStreamWaitEvent (codegen.driver_calls) on
raw stream handles. Reusing the event is safe: a wait takes the event's state when it is enqueued.
Works the same under CUDA-graph capture (record and wait become the graph's dependency edges).
"""
from __future__ import annotations

import ctypes
import threading

from epkern.codegen import driver_calls


class StreamOrder:
    """`wait(waiter, signaler)`: work enqueued on stream `waiter` from now on runs after everything
    enqueued on `signaler` so far. `wait_event(waiter, event)`: after a recorded torch.cuda.Event."""

    def __init__(self, device: int):
        from cuda.bindings import driver

        from epkern.codegen.runtime import ensure_context

        ensure_context(device)
        err, self._event = driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        _check(int(err), "cuEventCreate")
        self._event_arg = driver_calls.pointer(int(self._event))
        self._record, self._wait = driver_calls.entry("cuEventRecord"), driver_calls.entry("cuStreamWaitEvent")
        self._is_capturing = driver_calls.entry("cuStreamIsCapturing")
        self._capture_status = ctypes.c_int(0)
        self._capture_status_arg = ctypes.byref(self._capture_status)
        self._lock = threading.Lock()

    def wait(self, waiter: int, signaler: int) -> None:
        stream = driver_calls.stream_arg
        with self._lock:
            _check(self._record(self._event_arg, stream(signaler)), "cuEventRecord")
            err = self._wait(stream(waiter), self._event_arg, 0)
        _check(err, "cuStreamWaitEvent")

    def wait_event(self, waiter: int, event) -> None:
        handle = event.cuda_event
        if not handle:  # never recorded: nothing to wait for (as torch's wait_event)
            return
        _check(self._wait(driver_calls.stream_arg(waiter), driver_calls.pointer(handle), 0), "cuStreamWaitEvent")

    def is_capturing(self, stream: int) -> bool:
        """Whether work enqueued on the stream now goes into a CUDA graph being captured."""
        with self._lock:
            _check(self._is_capturing(driver_calls.stream_arg(stream), self._capture_status_arg), "cuStreamIsCapturing")
            return self._capture_status.value != 0  # CU_STREAM_CAPTURE_STATUS_NONE

    def close(self) -> None:
        from cuda.bindings import driver

        if self._event is not None:
            driver.cuEventDestroy(self._event)
            self._event = self._event_arg = None


def _check(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"{what} failed: {driver_calls.error_name(err)}")
