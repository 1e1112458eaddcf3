"""What every per-signature plan cache shares (fp8, layout, Buffer, the low-latency buffer).

A call whose signature was seen before passed every check then, so it runs the plan kept for it;
`signature` is a tensor argument's part of that key, `store` keeps a plan under a bounded count,
`fresh_output` makes a plan's allocation of one output.
"""
from __future__ import annotations

import functools

import torch


def signature(t):
    """What a tensor argument's checks depend on (None for None); AttributeError for a non-tensor."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


def store(plans: dict, key, plan, limit: int) -> None:
    """plans[key] = plan, all of them dropped first once `limit` are kept (a new token count is a new
    signature: a caller whose shapes never repeat must not grow the cache without bound)."""
    if len(plans) >= limit:
        plans.clear()
    plans[key] = plan


def fresh_output(shape, dtype: torch.dtype, device: torch.device):
    """A callable that returns a new uninitialized contiguous tensor of this shape, dtype and device each
    time: torch.empty_strided with the strides worked out now, its arguments bound in a C-level partial.
    On an H100 host it took 2.0 us of host time a call where torch.empty with keywords took 3.2 us
    (torch.empty's parser weighs more overloads; benchmarks/results/host_overhead.json, pieces)."""
    shape = tuple(int(n) for n in shape)
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return functools.partial(torch.empty_strided, shape, tuple(reversed(strides)), dtype=dtype, device=device)
