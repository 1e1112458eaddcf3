"""The balancing LP's interior-point solver on the CPU (numba), step for step the GPU kernel's algorithm.

Standard form per group (loads scaled so the heaviest unbalanced rank carries 1):

    min t   s.t.   t - s[h] + (A p)[h] = q[h]      (one row per rank h; s >= 0 is rank h's headroom)
                   0 <= p <= 1 (upper slack v = 1 - p),  t >= 0

where q[h] is rank h's load with every p = 0 and column (g, d) of A holds -w[g, d] at row g
and +w[g, d] at row o2r[g, d]. Mehrotra's predictor-corrector on the primal-dual system with
duals y (rows), zp/up (lower/upper bound of p), zt (t), zs (s). Eliminating every diagonal
block leaves M dy = rhs with the G x G matrix

    M = theta_t * 1 1^T + diag(theta_s) + sum_j theta_j w_j^2 (e_g - e_o)(e_g - e_o)^T

(a weighted graph Laplacian plus a diagonal plus a rank-one term), inverted by Beaton's sweep
(each lane of the kernel keeps one row; both solves of an iteration are then one product).
The GPU kernel runs the same iteration with one lane per rank; see templates/lplb_ipm.cu.j2.
"""
from __future__ import annotations

import numba
import numpy as np

MAX_ITERATIONS = 50
TOLERANCE = 1e-6      # relative duality gap, primal and dual infeasibility
STEP_FACTOR = 0.99995  # fraction of the step to the boundary: 0.995 took 10-14% more iterations on the
                      # test instances (cube 4.60 -> 4.13 mean) and 4 instead of 3 on Planner.run's benchmark
SAFE_STEP_FACTOR = 0.995  # a second attempt's after a numerical failure (sparse groups: a few tokens)
REFINE_MU = 1e-3      # the corrector's solve is refined once mu is below this (the predictor's never is)

STATUS_OPTIMAL = 0
STATUS_ITERATION_LIMIT = 1
STATUS_NUMERICAL = 2
STATUS_NAMES = {STATUS_OPTIMAL: "optimal", STATUS_ITERATION_LIMIT: "iteration limit",
                STATUS_NUMERICAL: "numerical failure"}


@numba.njit(cache=True)
def _apply_a(w, r2o, xp):
    """(A x_p)[h] = sum_d w[r,d] xp[r,d] - sum_d w[h,d] xp[h,d], r = r2o[h,d]; rank loads are q - A p."""
    G, D = w.shape
    out = np.zeros(G)
    for h in range(G):
        acc = 0.0
        for d in range(D):
            r = r2o[h, d]
            acc += w[r, d] * xp[r, d] - w[h, d] * xp[h, d]
        out[h] = acc
    return out


@numba.njit(cache=True)
def _sweep(m):
    """In place, m becomes -M^-1 by Beaton's sweep on every pivot (symmetric at every step, so the
    kernel's lane i keeps row i and reads column k as row k); False on a non-positive pivot."""
    G = m.shape[0]
    for k in range(G):
        col = m[:, k].copy()
        piv = col[k]
        if not (piv > 0.0) or not np.isfinite(piv):
            return False
        inv = 1.0 / piv
        for i in range(G):
            if i == k:
                m[i, :] = col * inv
                m[i, k] = -inv
            else:
                f = m[i, k] * inv
                m[i, :] -= f * col
                m[i, k] = f
    return True


@numba.njit(cache=True)
def _swept_product(neg_inv, rhs):
    """-neg_inv @ rhs, i.e. M^-1 rhs for neg_inv = -M^-1 from _sweep."""
    G = neg_inv.shape[0]
    out = np.empty(G)
    for i in range(G):
        acc = 0.0
        for j in range(G):
            acc -= neg_inv[i, j] * rhs[j]
        out[i] = acc
    return out


@numba.njit(cache=True)
def _apply_m(r2o, o2r, c, tht, ths, x):
    """M x from M's structure: (M x)[i] = tht sum(x) + ths[i] x[i] + sum_d c[i, d] (x[i] - x[o2r[i, d]])
    + sum_d c[r2o[i, d], d] (x[i] - x[r2o[i, d]]), with c = theta_p w^2."""
    G, D = c.shape
    out = np.empty(G)
    total = x.sum()
    for i in range(G):
        acc = tht * total + ths[i] * x[i]
        for d in range(D):
            o, r = o2r[i, d], r2o[i, d]
            acc += c[i, d] * (x[i] - x[o]) + c[r, d] * (x[i] - x[r])
        out[i] = acc
    return out


@numba.njit(cache=True)
def _swept_solve(neg_inv, r2o, o2r, c, tht, ths, rhs, refine):
    """M dy = rhs through the explicit inverse, plus one step of iterative refinement when asked:
    a product with an inverse is not backward stable when M is ill-conditioned (late iterations),
    the refined solution is (it matches a Cholesky solve's convergence). The predictor and the
    correctors of mu >= REFINE_MU do without: on all 7500 test instances no iteration count changes."""
    dy = _swept_product(neg_inv, rhs)
    if not refine:
        return dy
    return dy + _swept_product(neg_inv, rhs - _apply_m(r2o, o2r, c, tht, ths, dy))


@numba.njit(cache=True)
def _direction(w, r2o, o2r, neg_inv, ip, iv, it_, is_, zp, up, zt, zs, thp, tht, ths,
               rb, ru, rcp, rct, rcs, rxp, rvp, rxt, rxs, refine):
    """Newton direction for complementarity targets rxp (p*zp), rvp (v*up), rxt, rxs; ip, iv, it_,
    is_ are the reciprocals of p, v, t, s (the kernel multiplies by them instead of dividing)."""
    G, D = w.shape
    # eliminate the bound and slack blocks: rhat = rc - X^-1 rxz + V^-1 (rvw - W ru)
    rhp = rcp - rxp * ip + (rvp - up * ru) * iv
    rht = rct - rxt * it_
    rhs_s = rcs - rxs * is_
    gp = thp * rhp
    gt = tht * rht
    gs = ths * rhs_s
    rhs = rb + gt - gs + _apply_a(w, r2o, gp)
    dy = _swept_solve(neg_inv, r2o, o2r, thp * w * w, tht, ths, rhs, refine)
    # back-substitute: dx = Theta (A^T dy - rhat), then the duals
    dp = np.empty((G, D))
    for g in range(G):
        for d in range(D):
            o = o2r[g, d]
            dp[g, d] = thp[g, d] * (w[g, d] * (dy[o] - dy[g]) - rhp[g, d])
    dt = tht * (dy.sum() - rht)
    ds = ths * (-dy - rhs_s)
    dzp = (rxp - zp * dp) * ip
    dzt = (rxt - zt * dt) * it_
    dzs = (rxs - zs * ds) * is_
    dv = ru - dp
    dup = (rvp - up * dv) * iv
    return dp, dv, dt, ds, dy, dzp, dup, dzt, dzs


@numba.njit(cache=True)
def _ratio(x, dx):
    """-x / dx in fp32 for dx < 0, else 1: a step length needs no more (it is damped anyway),
    and the kernel's fp32 quotients are independent of one another instead of a chain of fp64 divisions."""
    return np.float32(x) / np.float32(-dx) if dx < 0.0 else np.float32(1.0)


@numba.njit(cache=True)
def _max_step(x, dx):
    """Largest alpha <= 1 keeping x + alpha dx >= 0 (elementwise over a flat view)."""
    a = np.float32(1.0)
    xf = x.ravel()
    df = dx.ravel()
    for i in range(xf.size):
        a = min(a, _ratio(xf[i], df[i]))
    return float(a)


@numba.njit(cache=True)
def _max_step1(x, dx):
    return float(min(np.float32(1.0), _ratio(x, dx)))


@numba.njit(cache=True)
def solve_group(w, q, r2o, o2r, max_iterations, tolerance):
    """Solve one scaled group: long steps (STEP_FACTOR), and after a numerical failure once more from
    the start with short ones (SAFE_STEP_FACTOR; long steps can drive a sparse group's LP to a singular
    normal matrix). Returns (p [G, D], t, status, iterations of both attempts)."""
    p, t, status, it = _interior_point(w, q, r2o, o2r, max_iterations, tolerance, STEP_FACTOR)
    if status == STATUS_NUMERICAL:
        p, t, status, more = _interior_point(w, q, r2o, o2r, max_iterations, tolerance, SAFE_STEP_FACTOR)
        it += more
    return p, t, status, it


@numba.njit(cache=True)
def _interior_point(w, q, r2o, o2r, max_iterations, tolerance, step_factor):
    """One IPM attempt on a scaled group, steps `step_factor` of the way to the boundary."""
    G, D = w.shape
    inv_n_comp = 1.0 / (2 * G * D + 1 + G)
    # start: p in the middle, t above every load, uniform duals summing to 0.9 (dual feasible)
    p = np.full((G, D), 0.5)
    v = np.full((G, D), 0.5)
    load = q - _apply_a(w, r2o, p)  # rank loads at p = 0.5
    t = load.max() + 1.0
    s = t - load
    y = np.full(G, 0.9 / G)
    zs = y.copy()
    zt = 0.1
    zp = np.full((G, D), 1.0 / G)
    up = np.full((G, D), 1.0 / G)
    qmax = np.abs(q).max()
    pinf_bound = tolerance * (1.0 + qmax)  # relative tests multiply (the kernel divides nowhere here)
    status = STATUS_ITERATION_LIMIT
    it = 0
    m = np.empty((G, G))
    while True:
        # residuals, objectives, convergence
        rb = q - (t - s + _apply_a(w, r2o, p))
        ru = 1.0 - p - v
        rcp = np.empty((G, D))
        for g in range(G):
            for d in range(D):
                rcp[g, d] = -(w[g, d] * (y[o2r[g, d]] - y[g]) + zp[g, d] - up[g, d])
        rct = 1.0 - (y.sum() + zt)
        rcs = y - zs
        pobj = t
        dobj = (q * y).sum() - up.sum()
        comp = (p * zp).sum() + (v * up).sum() + t * zt + (s * zs).sum()
        mu = comp * inv_n_comp
        gap = abs(pobj - dobj)  # relative to gap_scale
        gap_scale = max(abs(pobj), abs(dobj), 1e-12)
        pinf = max(np.abs(rb).max(), np.abs(ru).max())  # relative to 1 + qmax
        dinf = max(np.abs(rcp).max(), abs(rct), np.abs(rcs).max())
        if not (np.isfinite(gap) and np.isfinite(pinf) and np.isfinite(dinf)):
            status = STATUS_NUMERICAL
            break
        if gap <= tolerance * gap_scale and pinf <= pinf_bound and dinf <= tolerance:
            status = STATUS_OPTIMAL
            break
        if it >= max_iterations:
            break
        it += 1
        # normal matrix M = A Theta A^T, swept into -M^-1
        ip, iv, it_, is_ = 1.0 / p, 1.0 / v, 1.0 / t, 1.0 / s
        thp = 1.0 / (zp * ip + up * iv)
        tht = t * (1.0 / zt)
        ths = s * (1.0 / zs)
        for i in range(G):
            for j in range(G):
                m[i, j] = tht
            m[i, i] += ths[i]
        for g in range(G):
            for d in range(D):
                o = o2r[g, d]
                c = thp[g, d] * w[g, d] * w[g, d]
                m[g, g] += c
                m[o, o] += c
                m[g, o] -= c
                m[o, g] -= c
        if not _sweep(m):
            status = STATUS_NUMERICAL
            break
        # predictor (affine scaling) direction
        dp, dv, dt, ds, dy, dzp, dup, dzt, dzs = _direction(
            w, r2o, o2r, m, ip, iv, it_, is_, zp, up, zt, zs, thp, tht, ths, rb, ru, rcp, rct, rcs,
            -p * zp, -v * up, -t * zt, -s * zs, False)
        ap = min(_max_step(p, dp), _max_step(v, dv), _max_step1(t, dt), _max_step(s, ds))
        ad = min(_max_step(zp, dzp), _max_step(up, dup), _max_step1(zt, dzt), _max_step(zs, dzs))
        comp_aff = (((p + ap * dp) * (zp + ad * dzp)).sum() + ((v + ap * dv) * (up + ad * dup)).sum()
                    + (t + ap * dt) * (zt + ad * dzt) + ((s + ap * ds) * (zs + ad * dzs)).sum())
        sigma = (comp_aff * (1.0 / comp)) ** 3  # the kernel: a reciprocal taken with the residuals
        smu = sigma * mu
        # corrector: centring plus the second-order term of the predictor
        dp, dv, dt, ds, dy, dzp, dup, dzt, dzs = _direction(
            w, r2o, o2r, m, ip, iv, it_, is_, zp, up, zt, zs, thp, tht, ths, rb, ru, rcp, rct, rcs,
            smu - p * zp - dp * dzp, smu - v * up - dv * dup, smu - t * zt - dt * dzt, smu - s * zs - ds * dzs, mu < REFINE_MU)
        ap = min(1.0, step_factor * min(_max_step(p, dp), _max_step(v, dv), _max_step1(t, dt), _max_step(s, ds)))
        ad = min(1.0, step_factor * min(_max_step(zp, dzp), _max_step(up, dup), _max_step1(zt, dzt),
                                        _max_step(zs, dzs)))
        p = p + ap * dp
        v = v + ap * dv
        t = t + ap * dt
        s = s + ap * ds
        y = y + ad * dy
        zp = zp + ad * dzp
        up = up + ad * dup
        zt = zt + ad * dzt
        zs = zs + ad * dzs
    return np.minimum(np.maximum(p, 0.0), 1.0), t, status, it


@numba.njit(cache=True)
def solve_groups(w, f, r2o, o2r, prev, max_iterations, tolerance):
    """Solve every group of w [n_group, G, D] / f [n_group, G] (unscaled, >= 0).

    Returns probs [n_group, G, D] (a failed group keeps prev), status and iterations [n_group],
    and the optimal busiest-rank load per group in the input's units."""
    n_group, G, D = w.shape
    probs = np.empty((n_group, G, D))
    status = np.empty(n_group, dtype=np.int32)
    iters = np.empty(n_group, dtype=np.int32)
    objective = np.empty(n_group)
    for k in range(n_group):
        # scale: the heaviest rank with nothing moved carries 1
        scale = 0.0
        for h in range(G):
            scale = max(scale, f[k, h] + w[k, h].sum())
        if scale <= 0.0:
            probs[k] = 0.5
            status[k] = STATUS_OPTIMAL
            iters[k] = 0
            objective[k] = 0.0
            continue
        ws = w[k] / scale
        q = f[k] / scale
        for h in range(G):
            for d in range(D):
                q[h] += ws[r2o[h, d], d]
        p, t, st, it = solve_group(ws, q, r2o, o2r, max_iterations, tolerance)
        status[k] = st
        iters[k] = it
        probs[k] = p if st == STATUS_OPTIMAL else prev[k]
        objective[k] = (q - _apply_a(ws, r2o, probs[k])).max() * scale
    return probs, status, iters, objective
