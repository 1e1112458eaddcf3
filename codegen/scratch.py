"""Device scratch words that kernels return to zero themselves (last-block tickets).

A kernel that counts finished blocks in a ticket and resets it on exit needs the ticket zeroed
once. Zeroing it on every launch would cost a memset, so it is zeroed only while it cannot be
trusted: a tensor first allocated inside a CUDA-graph capture is zeroed by a memset node of that
one graph only, so until an eager launch has zeroed it, every graph captured with it zeroes it
again (a memset node of its own), and the next eager use zeroes it once.
"""
from __future__ import annotations

import torch


class SelfResettingZeros:
    """int32 zeros [numel] on a device, for kernels that leave them at zero when they finish."""

    def __init__(self, numel: int, device: torch.device):
        self.tensor = torch.zeros(numel, dtype=torch.int32, device=device)
        self.trusted = not torch.cuda.is_current_stream_capturing()

    def get(self) -> torch.Tensor:
        """The tensor, zeroed first (on the current stream, or in the graph being captured) unless trusted."""
        if not self.trusted:
            self.tensor.zero_()
            self.trusted = not torch.cuda.is_current_stream_capturing()
        return self.tensor
