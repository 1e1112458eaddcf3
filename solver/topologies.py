"""Redundancy topologies: which rank holds the copy of which rank's replicated experts.

An `r2o` matrix [group_size, dups] (LPLB's `redundant_to_original`) says that redundant
slot `d` on rank `g` copies bundle `d` of rank `r2o[g, d]`. Every column must be a
permutation without fixed points, so each bundle has exactly one copy on exactly one
other rank: every redundant slot joins exactly two ranks (an edge of the LP graph).
"""
from __future__ import annotations

import torch

MAX_GROUP_SIZE = 32  # the GPU solver runs one group per warp
MAX_DUPS = 8


def _tensor(columns: list[list[int]]) -> torch.Tensor:
    return torch.tensor(columns, dtype=torch.int32).T.contiguous()


def cube_8p2e() -> torch.Tensor:
    """8 ranks, 2 redundant slots each: two 4-rings joined rank to rank (a cube)."""
    return _tensor([[3, 0, 1, 2, 7, 4, 5, 6], [6, 7, 4, 5, 0, 1, 2, 3]])


def hypercube_16p2e() -> torch.Tensor:
    """16 ranks, 2 redundant slots each: four 4-rings, the second slot joining ring i to ring i-1."""
    return _tensor([[3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14],
                    [12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


def ring(n: int) -> torch.Tensor:
    """n ranks, 1 redundant slot each: rank g copies rank (g + 1) % n (LPLB's RING_8P for n = 8)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"ring(n={n!r}): n must be an int >= 2")
    return _tensor([[(g + 1) % n for g in range(n)]])


def torus_2d(m: int, n: int) -> torch.Tensor:
    """m x n ranks, 2 redundant slots each: rank i*n+j copies its neighbours ((i+1)%m, j) and (i, (j+1)%n)."""
    for name, v in (("m", m), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ValueError(f"torus_2d({name}={v!r}): both sides must be ints >= 2")
    rows = [[((i + 1) % m) * n + j, i * n + (j + 1) % n] for i in range(m) for j in range(n)]
    return torch.tensor(rows, dtype=torch.int32)


def validate_r2o(r2o) -> torch.Tensor:
    """Check a redundant-to-original matrix and return it as a contiguous CPU int32 tensor.

    Raises TypeError/ValueError naming the problem: shape, dtype, range, self-edges, or a
    column that is not a permutation (a bundle copied twice or never).
    """
    if not isinstance(r2o, torch.Tensor):
        raise TypeError(f"redundant_to_original: expected a torch.Tensor, got {type(r2o).__name__}")
    if r2o.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"redundant_to_original: dtype {r2o.dtype} not supported; expected an integer tensor")
    if r2o.dim() != 2:
        raise ValueError(f"redundant_to_original: expected shape [group_size, dups], got {tuple(r2o.shape)}")
    group_size, dups = r2o.shape
    if not 2 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"redundant_to_original: group_size={group_size} must be in [2, {MAX_GROUP_SIZE}]")
    if not 1 <= dups <= MAX_DUPS:
        raise ValueError(f"redundant_to_original: dups={dups} must be in [1, {MAX_DUPS}]")
    cpu = r2o.detach().to("cpu", torch.int64)
    if int(cpu.min()) < 0 or int(cpu.max()) >= group_size:
        raise ValueError(f"redundant_to_original: values must be rank indices in [0, {group_size}), "
                         f"got range [{int(cpu.min())}, {int(cpu.max())}]")
    ranks = torch.arange(group_size).unsqueeze(1)
    self_edges = (cpu == ranks).nonzero().tolist()
    if self_edges:
        g, d = self_edges[0]
        raise ValueError(f"redundant_to_original[{g}, {d}] = {g}: a rank cannot hold the copy of its own bundle")
    for d in range(dups):
        counts = torch.bincount(cpu[:, d], minlength=group_size)
        if not bool((counts == 1).all()):
            missing = (counts == 0).nonzero().flatten().tolist()
            twice = (counts > 1).nonzero().flatten().tolist()
            raise ValueError(f"redundant_to_original[:, {d}] must be a permutation of the ranks (each bundle "
                             f"copied exactly once): ranks copied twice {twice}, never copied {missing}")
    return cpu.to(torch.int32).contiguous()


def original_to_redundant(r2o: torch.Tensor) -> torch.Tensor:
    """o2r[g, d]: the rank holding the copy of bundle d of rank g (inverse permutation per column)."""
    return r2o.long().argsort(dim=0).to(torch.int32).contiguous()
