"""The low-latency handle: DeepEP's five fields as a tuple, epkern's extra tensors as attributes.

DeepEP's `low_latency_dispatch` returns `handle = (src_info, layout_range, M, hidden, num_experts)`
and callers unpack it (`src_info, layout_range, M, hidden, E = handle`). epkern's combine also needs
where each received token's copies went (`token_rows`), how many tokens each source sent
(`recv_tokens`) and, when dispatch carried the top-k weights, those weights (`token_weights`).
`LowLatencyHandle` is a length-5 tuple (so DeepEP's unpacking, indexing and `len` work) carrying
those tensors as attributes. A plain tuple has lost them, so combine rejects it by name.
"""
from __future__ import annotations

import torch


class LowLatencyHandle(tuple):
    """(src_info [L, R*M] int32, layout_range [L, R] int64, M, hidden, num_experts), plus

    token_rows [R, M, K] int32: l * R*M + row of copy k of source r's token t here, -1 = elsewhere;
    recv_tokens [R] int32: tokens source r sent (0 if it was masked);
    token_weights [R, M, K] float32 or None: the top-k weights dispatch carried (topk_weights=),
    which combine then uses instead of asking every rank for its weights.
    """

    def __new__(cls, src_info: torch.Tensor, layout_range: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                hidden: int, num_experts: int, *, token_rows: torch.Tensor, recv_tokens: torch.Tensor,
                token_weights: torch.Tensor | None = None):
        self = super().__new__(cls, (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts))
        # (a tuple subclass cannot have non-empty __slots__: the extras live in the instance dict)
        object.__setattr__(self, "_tensors", (token_rows, recv_tokens, token_weights))
        return self

    @property
    def token_rows(self) -> torch.Tensor:
        return self._tensors[0]

    @property
    def recv_tokens(self) -> torch.Tensor:
        return self._tensors[1]

    @property
    def token_weights(self) -> torch.Tensor | None:
        return self._tensors[2]

    @property
    def carries_weights(self) -> bool:
        return self._tensors[2] is not None

    def __setattr__(self, name, value):
        raise AttributeError("LowLatencyHandle is immutable")

    def __reduce__(self):
        return (_rebuild, (tuple(self), self._tensors))

    def __repr__(self) -> str:
        src_info, layout_range, m, hidden, experts = self
        return (f"LowLatencyHandle(M={m}, hidden={hidden}, num_experts={experts}, src_info={tuple(src_info.shape)}, "
                f"token_rows={tuple(self.token_rows.shape)}, weights carried={self.carries_weights})")


def _rebuild(fields, tensors):
    return LowLatencyHandle(*fields, token_rows=tensors[0], recv_tokens=tensors[1], token_weights=tensors[2])


def as_handle(handle) -> LowLatencyHandle:
    """The handle itself, or a TypeError that says why a foreign tuple cannot stand in for it."""
    if isinstance(handle, LowLatencyHandle):
        return handle
    if isinstance(handle, tuple):
        raise TypeError(
            f"handle: a plain {len(handle)}-tuple is not a low-latency handle; pass the handle low_latency_dispatch "
            "returned (an epkern LowLatencyHandle: DeepEP's 5 fields plus token_rows / recv_tokens, which a rebuilt "
            "tuple has lost)")
    raise TypeError(f"handle: expected the LowLatencyHandle returned by low_latency_dispatch, got {type(handle).__name__}")
