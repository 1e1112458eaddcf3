"""EventHandle and EventOverlap: DeepEP's CUDA-event wrappers, for overlapping communication with compute.

`EventHandle()` records an event on the current stream, as DeepEP's C++ EventHandle does, so
Megatron's `EventOverlap(EventHandle())` marks "everything issued so far" as the point the next
call waits for. Without CUDA (the portable backend on CPU) there is nothing to wait for: the
handle holds no event and waiting on it returns at once.
"""
from __future__ import annotations

import torch


class EventHandle:
    """A CUDA event recorded on the current stream when made (or on `stream`, an epkern extension)."""

    def __init__(self, *, stream: torch.cuda.Stream | None = None) -> None:
        self.event = None
        if torch.cuda.is_available():
            self.event = torch.cuda.Event()
            self.event.record(stream if stream is not None else torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """The current stream waits until the recorded work is done."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


def cuda_event(event) -> "torch.cuda.Event | None":
    """The torch.cuda.Event inside an EventOverlap's event (an EventHandle, or a raw torch event)."""
    return event.event if isinstance(event, EventHandle) else event


class EventOverlap:
    """A recorded event plus the tensors that must stay alive until it completes.

    `current_stream_wait()` makes the current stream wait for the event. Used as a context
    manager (`with event: ...`) the body is issued first and the current stream waits at exit,
    so work issued inside overlaps with the communication the event tracks.
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    @classmethod
    def record(cls, stream: torch.cuda.Stream | None = None, extra_tensors: tuple | None = None) -> "EventOverlap":
        """An event recorded now on stream (the current stream by default)."""
        return cls(EventHandle(stream=stream), extra_tensors)

    def current_stream_wait(self) -> None:
        if self.event is None:
            raise RuntimeError("EventOverlap.current_stream_wait: this EventOverlap holds no event "
                               "(the call that returned it ran with async_finish=False)")
        self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
