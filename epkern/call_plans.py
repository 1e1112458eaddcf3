"""What every per-signature plan cache shares (fp8, layout, Buffer, the low-latency buffer).

A call whose signature was seen before passed every check then, so it runs the plan kept for it;
`signature` is a tensor argument's part of that key, `store` keeps a plan under a bounded count.
"""
from __future__ import annotations


def signature(t):
    """What a tensor argument's checks depend on (None for None); AttributeError for a non-tensor."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


def store(plans: dict, key, plan, limit: int) -> None:
    """plans[key] = plan, all of them dropped first once `limit` are kept (a new token count is a new
    signature: a caller whose shapes never repeat must not grow the cache without bound)."""
    if len(plans) >= limit:
        plans.clear()
    plans[key] = plan
