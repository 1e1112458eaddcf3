"""EventOverlap: DeepEP's wrapper of a CUDA event, for overlapping communication with compute."""
from __future__ import annotations

import torch


class EventOverlap:
    """A recorded CUDA event plus the tensors that must stay alive until it completes.

    `current_stream_wait()` makes the current stream wait for the event. Used as a context
    manager (`with event: ...`) the body is issued first and the current stream waits at exit,
    so work issued inside overlaps with the communication the event tracks.
    """

    def __init__(self, event: torch.cuda.Event | None = None, extra_tensors: tuple | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    @classmethod
    def record(cls, stream: torch.cuda.Stream | None = None, extra_tensors: tuple | None = None) -> "EventOverlap":
        """An event recorded now on stream (the current stream by default)."""
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return cls(event, extra_tensors)

    def current_stream_wait(self) -> None:
        if self.event is None:
            raise RuntimeError("EventOverlap.current_stream_wait: this EventOverlap holds no event")
        torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
