"""The per-group balancing LP: assembly from a placement and a workload, rank loads, and HiGHS.

For one group of `G` ranks with `D` redundant slots each, bundle `(g, d)` carries `w[g, d]`
tokens (the sum over the `combined` experts in slots `j*D + d`, j < combined, of rank g),
rank `g` carries `f[g]` fixed tokens, and `p[g, d]` in [0, 1] is the share of bundle
`(g, d)` kept on rank g; the rest runs on the copy at rank `o2r[g, d]`. Rank h's load:

    load(h) = f[h] + sum_d p[h, d] w[h, d] + sum_d (1 - p[r2o[h, d], d]) w[r2o[h, d], d]

The LP minimizes t subject to load(h) <= t for every h. `solve_highs` is the exact
reference the tests compare the interior-point solvers with.
"""
from __future__ import annotations

import numpy as np
import torch


def bundle_loads(workload: torch.Tensor, phy2log: torch.Tensor, n_group: int, group_size: int, dups: int,
                 combined: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [n_group, G, D], f [n_group, G]) in float64 from per-logical-expert counts and the placement.

    phy2log: [n_group * G * n_local] physical -> logical ids in LPLB's slot order
    (replicated originals, fixed experts, redundant copies)."""
    n_ranks = n_group * group_size
    n_logical = workload.numel()
    n_local_logical = n_logical // n_ranks
    per_phys = workload.reshape(-1).to(torch.float64)[phy2log.long()].reshape(n_ranks, -1)
    replicated = per_phys[:, : combined * dups].reshape(n_group, group_size, combined, dups).sum(2)
    fixed = per_phys[:, combined * dups: n_local_logical].sum(1).reshape(n_group, group_size)
    return replicated, fixed


def rank_loads(w: torch.Tensor, f: torch.Tensor, probs: torch.Tensor, r2o: torch.Tensor) -> torch.Tensor:
    """Load of every rank [..., G] after splitting bundles by probs [..., G, D] (any float dtype)."""
    probs = probs.to(w.dtype).clamp(0, 1)
    index = r2o.long().to(w.device).expand_as(w)
    moved = (w * (1 - probs)).gather(-2, index)  # rank h runs (1 - p) of bundle d of rank r2o[h, d]
    return f + (w * probs).sum(-1) + moved.sum(-1)


def lp_matrices(w: np.ndarray, f: np.ndarray, r2o: np.ndarray):
    """Inequality form over x = (p[0,0], p[0,1], ..., p[G-1,D-1], t): A_ub x <= b_ub, bounds."""
    group_size, dups = w.shape
    n = group_size * dups
    a = np.zeros((group_size, n + 1))
    b = -np.asarray(f, dtype=np.float64).copy()
    for h in range(group_size):
        for d in range(dups):
            g = int(r2o[h, d])
            a[h, h * dups + d] += w[h, d]   # kept share of h's own bundle
            a[h, g * dups + d] -= w[g, d]   # the copy of g's bundle runs (1 - p) here
            b[h] -= w[g, d]
        a[h, n] = -1.0
    bounds = [(0.0, 1.0)] * n + [(None, None)]
    return a, b, bounds


def solve_highs(w, f, r2o) -> tuple[float, np.ndarray]:
    """Exact optimum (t*, p* [G, D]) of one group's LP with SciPy's HiGHS."""
    from scipy.optimize import linprog

    w = np.asarray(w, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    r2o = np.asarray(r2o)
    a, b, bounds = lp_matrices(w, f, r2o)
    c = np.zeros(a.shape[1])
    c[-1] = 1.0
    res = linprog(c, A_ub=a, b_ub=b, bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the balancing LP: {res.message}")
    return float(res.x[-1]), res.x[:-1].reshape(w.shape)
