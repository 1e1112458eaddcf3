"""The streaming round plan of the NVLink normal mode, on CPU: a pure-Python run of the kernels'
window and slot arithmetic (epkern.normal.rounds, the same expressions the templates compute)
over every rank, round and sender block, checked against brute force: every row reaches its
final position exactly once, no slot is written twice in a round or read before it is written,
no slot lies past the buffer, and every rank agrees on the number of rounds."""
import random

import pytest

from epkern.normal import rounds as rd

NUM_BLOCKS = 3


def make_routing(rng, tokens_per_rank, num_ranks):
    """is_token_in_rank per source rank: random, with idle ranks and ranks sending nowhere."""
    p = rng.choice((0.0, 0.3, 0.9, 1.0))
    return [[[rng.random() < p for _ in range(num_ranks)] for _ in range(t)] for t in tokens_per_rank]


def prefix_and_heads(in_rank, num_ranks):
    counts = [[sum(tok[d] for tok in in_rank[s]) for d in range(num_ranks)] for s in range(num_ranks)]
    P = [[sum(counts[i][j] for i in range(s + 1)) for j in range(num_ranks)] for s in range(num_ranks)]
    heads = []
    for s in range(num_ranks):
        nxt = [P[s - 1][d] if s else 0 for d in range(num_ranks)]
        h = []
        for tok in in_rank[s]:
            row = []
            for d in range(num_ranks):
                if tok[d]:
                    row.append(nxt[d])
                    nxt[d] += 1
                else:
                    row.append(-1 - nxt[d])
            h.append(row)
        heads.append(h)
    return P, heads


def simulate_dispatch(in_rank, P, heads, num_ranks, capacity, plan):
    """recv[d][row] = (source, token), as the rounds of the kernel fill it."""
    recv = [[None] * P[-1][d] for d in range(num_ranks)]
    for k in range(plan.num_rounds):
        slots = [dict() for _ in range(num_ranks)]   # slot -> (source, row) written this round
        chunks = {}
        for s in range(num_ranks):
            T = len(heads[s])
            windows = [rd.dispatch_window(P, s, d, plan, k) for d in range(num_ranks)]
            lo, hi = rd.dispatch_token_hull(heads[s], P, s, plan, k)
            assert 0 <= lo <= hi <= T
            for b in range(NUM_BLOCKS):
                t0, t1 = lo + rd.part_start(hi - lo, b, NUM_BLOCKS), lo + rd.part_start(hi - lo, b + 1, NUM_BLOCKS)
                for d in range(num_ranks):
                    if d != s:
                        chunks[s, d, b] = rd.dispatch_chunk(heads[s], t0, t1, d, windows[d])
                for t in range(t0, t1):
                    for d in range(num_ranks):
                        head = heads[s][t][d]
                        if head < 0 or not windows[d][0] <= head < windows[d][1]:
                            continue
                        if d == s:
                            assert recv[d][head] is None
                            recv[d][head] = (s, t)
                            continue
                        slot = rd.dispatch_slot(P, s, d, head, plan, k)
                        assert 0 <= slot < capacity, (slot, capacity)
                        assert slot not in slots[d]
                        slots[d][slot] = (s, head, t)
        # receivers copy exactly the announced rows out of their slots
        for d in range(num_ranks):
            for s in range(num_ranks):
                if s == d:
                    continue
                for b in range(NUM_BLOCKS):
                    begin, end = chunks[s, d, b]
                    for row in range(begin, end):
                        slot = rd.dispatch_slot(P, s, d, row, plan, k)
                        src, want_row, t = slots[d].pop(slot)
                        assert (src, want_row) == (s, row)
                        assert recv[d][row] is None
                        recv[d][row] = (s, t)
            assert not slots[d], "a row was written but no receiver announced it"
    return recv


@pytest.mark.parametrize("seed", range(40))
def test_dispatch_rounds_match_brute_force(seed):
    rng = random.Random(seed)
    R = rng.randint(1, 8)
    tokens = [rng.choice((0, 1, 5, 17, 40)) for _ in range(R)]
    in_rank = make_routing(rng, tokens, R)
    P, heads = prefix_and_heads(in_rank, R)
    capacity = rng.choice((1, 2, 7, 30, 1000))
    plan = rd.dispatch_plan(rd.max_remote_rows(P), capacity)
    assert plan.window <= capacity and plan.num_rounds * plan.window >= rd.max_remote_rows(P)
    recv = simulate_dispatch(in_rank, P, heads, R, capacity, plan)
    for d in range(R):   # brute force: sources in rank order, tokens in order
        expect = [(s, t) for s in range(R) for t in range(tokens[s]) if in_rank[s][t][d]]
        assert recv[d] == expect


def test_dispatch_rounds_from_a_worst_case_bound():
    """num_worst_tokens plans from an upper bound; the windows still cover every row once."""
    rng = random.Random(7)
    R, tokens = 3, [30, 0, 12]
    in_rank = make_routing(rng, tokens, R)
    P, heads = prefix_and_heads(in_rank, R)
    worst = sum(tokens)
    plan = rd.dispatch_plan(worst, 4)
    recv = simulate_dispatch(in_rank, P, heads, R, 4, plan)
    for d in range(R):
        assert recv[d] == [(s, t) for s in range(R) for t in range(tokens[s]) if in_rank[s][t][d]]


def test_one_round_when_it_fits():
    assert rd.dispatch_plan(0, 10) == rd.RoundPlan(1, 1)
    assert rd.dispatch_plan(10, 10) == rd.RoundPlan(1, 10)
    assert rd.dispatch_plan(11, 10) == rd.RoundPlan(2, 6)
    assert rd.combine_plan(4096, 8192, 2) == rd.RoundPlan(1, 4096)
    assert rd.combine_plan(65536, 8192, 2) == rd.RoundPlan(8, 8192)
    assert rd.combine_plan(0, 3, 4) == rd.RoundPlan(1, 1)
    with pytest.raises(ValueError, match="num_nvl_bytes"):
        rd.combine_plan(5, 2, 4)
    with pytest.raises(ValueError, match="num_nvl_bytes"):
        rd.dispatch_plan(5, 0)


@pytest.mark.parametrize("seed", range(40))
def test_combine_rounds_match_brute_force(seed):
    rng = random.Random(1000 + seed)
    R = rng.randint(1, 8)
    tokens = [rng.choice((0, 1, 5, 17, 40)) for _ in range(R)]
    in_rank = make_routing(rng, tokens, R)
    P, heads = prefix_and_heads(in_rank, R)
    capacity = rng.choice((R - 1 or 1, 2 * R, 7 * R, 1000))
    plan = rd.combine_plan(max(tokens), capacity, R)
    # each rank's received rows: source index and token, in receive order
    recv_src = [[t for s in range(R) for t in range(tokens[s]) if in_rank[s][t][d]] for d in range(R)]
    got = [dict() for _ in range(R)]   # source -> {(token, sender)}
    for k in range(plan.num_rounds):
        slots = [dict() for _ in range(R)]
        for r in range(R):   # senders push back what they received from every other source
            for s in range(R):
                if s == r:
                    continue
                lo, hi = _base(P, s, r), P[s][r]
                a, b = rd.combine_row_range(recv_src[r], lo, hi, plan, k)
                for blk in range(NUM_BLOCKS):
                    for row in range(a + rd.part_start(b - a, blk, NUM_BLOCKS), a + rd.part_start(b - a, blk + 1, NUM_BLOCKS)):
                        t = recv_src[r][row]
                        slot = rd.combine_slot(t, r, s, plan, k, R)
                        assert 0 <= slot < capacity
                        assert slot not in slots[s]
                        slots[s][slot] = (t, r)
        for s in range(R):   # reducers: every token of the window, the rows of every rank it reached
            t_lo, t_hi = rd.combine_token_window(tokens[s], plan, k)
            for t in range(t_lo, t_hi):
                for d in range(R):
                    if d == s or not in_rank[s][t][d]:
                        continue
                    assert slots[s].pop(rd.combine_slot(t, d, s, plan, k, R)) == (t, d)
                    assert (t, d) not in got[s]
                    got[s][t, d] = k
            assert not slots[s], "a row was pushed for a token outside the round"
    for s in range(R):
        assert set(got[s]) == {(t, d) for t in range(tokens[s]) for d in range(R) if d != s and in_rank[s][t][d]}


def _base(P, s, d):
    return P[s - 1][d] if s else 0


def test_the_handle_carries_the_plan_inputs():
    """Cached dispatch and combine plan from the handle's maxima (no sync); a plain tuple loses them."""
    import torch

    from epkern.normal.handle import DispatchHandle, check_handle

    t = torch.zeros(2, 2, dtype=torch.int32)
    handle = DispatchHandle(t, t, t, t, t.bool(), t)
    assert (handle.max_remote_rows, handle.max_tokens) == (None, None)
    handle.max_remote_rows, handle.max_tokens = 123, 45
    assert check_handle(handle, 2) is handle
    a, b, c, d, e, f = handle   # still DeepEP's six fields
    assert len(handle) == 6 and f is t
    rebuilt = check_handle(tuple(handle), 2)
    assert (rebuilt.max_remote_rows, rebuilt.max_tokens) == (None, None)
    assert rd.max_remote_rows([[3, 1], [5, 4]]) == max(5 - 3, 4 - 3)
