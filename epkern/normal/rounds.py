"""Streaming normal-mode dispatch and combine through a fixed peer buffer: the round plan.

What does not fit the peer buffer at once goes in rounds, one kernel launch per round (each
launch's start barrier is the round boundary: a rank starts round k + 1 only after every rank's
round k is complete, so every slot can be reused). Rows are written straight into their final
positions in the output tensors, so the receive order stays (source rank, token index) whatever
the number of rounds. Every rank derives the plan from the counts the notify kernel already
exchanged (the same maxima everywhere), so every rank launches the same number of rounds without
extra communication.

Dispatch: a rank's rows from other ranks are numbered in receive order, skipping its own rows
(those go straight into recv_x and take no slot): the *remote index*. Round k carries the rows
whose remote index lies in [k W, (k + 1) W) at every receiver, W = ceil(max remote rows / K), in
slot remote index - k W; a rank's own rows are split evenly over the rounds. The last round's
window is open-ended: a row past it (a num_worst_tokens too small) is reported as an overflow,
never dropped silently.

Combine: round k carries the tokens [k Wc, (k + 1) Wc) of every rank: each rank pushes back the
rows it received for those tokens into slot (token - k Wc) x (R - 1) + j at their source (j: the
sender's rank with the source's own left out), and the source sums each token's rows in one go.

The functions below are the plan (host side) and a pure-Python model of the kernels' window and
slot arithmetic, which tests/test_intranode_rounds.py checks against brute force; the templates
compute exactly the same expressions (templates/intranode_dispatch.cu.j2, intranode_combine.cu.j2).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    num_rounds: int   # launches (>= 1)
    window: int       # rows (dispatch: remote index) or tokens (combine) per round, >= 1

    def bounds(self, k: int) -> tuple[int, int | None]:
        """[lo, hi) of round k; hi None: open-ended (the last round)."""
        return k * self.window, None if k == self.num_rounds - 1 else (k + 1) * self.window


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def dispatch_plan(max_remote_rows: int, slot_capacity: int) -> RoundPlan:
    """Rounds for a dispatch whose busiest receiver takes max_remote_rows rows from other ranks."""
    if slot_capacity < 1:
        raise ValueError("the peer buffer holds no dispatch row; make num_nvl_bytes larger "
                         "(Config.get_nvl_buffer_size_hint)")
    rounds = max(1, _ceil_div(max_remote_rows, slot_capacity))
    return RoundPlan(rounds, max(1, _ceil_div(max_remote_rows, rounds)))


def combine_slots_per_token(num_ranks: int) -> int:
    return max(1, num_ranks - 1)


def combine_token_capacity(slot_capacity: int, num_ranks: int) -> int:
    """Tokens one combine round can take: (R - 1) slots each."""
    return slot_capacity // combine_slots_per_token(num_ranks)


def combine_plan(max_tokens: int, slot_capacity: int, num_ranks: int) -> RoundPlan:
    """Rounds for a combine whose largest rank has max_tokens tokens."""
    per_round = combine_token_capacity(slot_capacity, num_ranks)
    if per_round < 1:
        raise ValueError(f"the peer buffer holds {slot_capacity} combine rows, fewer than one token's "
                         f"{combine_slots_per_token(num_ranks)}; make num_nvl_bytes larger "
                         "(Config.get_nvl_buffer_size_hint)")
    rounds = max(1, _ceil_div(max_tokens, per_round))
    return RoundPlan(rounds, max(1, _ceil_div(max_tokens, rounds)))


# -- the kernels' arithmetic (pure Python; P is the rank prefix matrix as nested lists) ------------
def _base(P, s: int, d: int) -> int:
    return P[s - 1][d] if s > 0 else 0


def _count(P, s: int, d: int) -> int:
    return P[s][d] - _base(P, s, d)


def remote_rows(P, d: int) -> int:
    """Rows rank d receives from other ranks."""
    return P[-1][d] - _count(P, d, d)


def max_remote_rows(P) -> int:
    return max(remote_rows(P, d) for d in range(len(P)))


def dispatch_adjust(P, s: int, d: int) -> int:
    """Remote index = row - this, for a row from s at d (s != d): d's own rows are skipped."""
    return _count(P, d, d) if s > d else 0


def dispatch_window(P, rank: int, d: int, plan: RoundPlan, k: int) -> tuple[int, int]:
    """Rows [lo, hi) at rank d (row numbers of d's recv_x) that `rank` sends in round k."""
    base, n = _base(P, rank, d), _count(P, rank, d)
    if d == rank:   # own rows: an even share per round
        return base + n * k // plan.num_rounds, base + n * (k + 1) // plan.num_rounds
    adj = dispatch_adjust(P, rank, d)
    lo, hi = plan.bounds(k)
    wlo = max(base, lo + adj)
    whi = base + n if hi is None else min(base + n, hi + adj)
    return wlo, max(wlo, whi)


def dispatch_slot(P, s: int, d: int, row: int, plan: RoundPlan, k: int) -> int:
    return row - dispatch_adjust(P, s, d) - k * plan.window


def head_position(head: int) -> int:
    """send_head holds a sent token's row, or -1 - the row the next sent token takes."""
    return head if head >= 0 else -1 - head


def lower_bound(values, x: int, lo: int, hi: int) -> int:
    """First i in [lo, hi) with values[i] >= x (values non-decreasing), hi if none."""
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def dispatch_token_hull(send_head, P, rank: int, plan: RoundPlan, k: int) -> tuple[int, int]:
    """Tokens [lo, hi) that hold every token `rank` sends in round k (one binary search per rank)."""
    T, R = len(send_head), len(P)
    if plan.num_rounds == 1:
        return 0, T
    lo, hi = T, 0
    for d in range(R):
        wlo, whi = dispatch_window(P, rank, d, plan, k)
        if wlo >= whi:
            continue
        col = [head_position(send_head[t][d]) for t in range(T)]
        lo = min(lo, lower_bound(col, wlo, 0, T))
        hi = max(hi, lower_bound(col, whi, 0, T))
    return (lo, hi) if lo < hi else (0, 0)


def part_start(n: int, part: int, num_parts: int) -> int:
    return n * part // num_parts


def dispatch_chunk(send_head, t0: int, t1: int, d: int, window: tuple[int, int]) -> tuple[int, int]:
    """Rows [begin, end) at d that tokens [t0, t1) send within the window (a sender block's announcement)."""
    if t0 >= t1:
        return 0, 0
    first, last = send_head[t0][d], send_head[t1 - 1][d]
    begin = head_position(first)
    end = last + 1 if last >= 0 else -1 - last
    begin, end = max(begin, window[0]), min(end, window[1])
    return begin, max(begin, end)


def combine_slot(t: int, sender: int, source: int, plan: RoundPlan, k: int, num_ranks: int) -> int:
    j = sender if sender < source else sender - 1
    return (t - k * plan.window) * combine_slots_per_token(num_ranks) + j


def combine_token_window(num_tokens: int, plan: RoundPlan, k: int) -> tuple[int, int]:
    lo, hi = plan.bounds(k)
    lo = min(lo, num_tokens)
    return lo, num_tokens if hi is None else min(hi, num_tokens)


def combine_row_range(recv_src_idx, lo: int, hi: int, plan: RoundPlan, k: int) -> tuple[int, int]:
    """Rows [a, b) among the rows [lo, hi) received from one source whose token is in round k's window."""
    if plan.num_rounds == 1:
        return lo, hi
    wlo, whi = plan.bounds(k)
    a = lower_bound(recv_src_idx, wlo, lo, hi)
    b = hi if whi is None else lower_bound(recv_src_idx, whi, a, hi)
    return a, b
