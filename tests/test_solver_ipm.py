"""The interior-point solvers (numba on the CPU, the one-warp kernel on the GPU) against HiGHS."""
import numpy as np
import pytest
import torch

from epkern.codegen import jit
from epkern.solver import cube_8p2e, hypercube_16p2e, lp, original_to_redundant, ring, torus_2d
from epkern.solver import ipm_numba
from epkern.solver.ipm_kernel import IpmSpec, deployment_specs, solve_batch_cuda

TOPOLOGIES = {"cube8x2": cube_8p2e, "hypercube16x2": hypercube_16p2e, "ring8": lambda: ring(8),
              "torus8x4": lambda: torus_2d(8, 4), "ring3": lambda: ring(3)}
N_INSTANCES = 1500
KINDS = ("lognormal", "heavy_tail", "normal", "sparse", "zero", "hot_expert", "hot_fixed", "all_equal", "no_fixed")


def random_instances(rng, n, G, D):
    """Integer token counts w [n, G, D], f [n, G] over a mix of skewed and degenerate kinds."""
    w = np.zeros((n, G, D))
    f = np.zeros((n, G))
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "lognormal":
            w[i], f[i] = rng.lognormal(6, 1, (G, D)), rng.lognormal(7, 1, G)
        elif kind == "heavy_tail":
            w[i], f[i] = rng.lognormal(4, 3, (G, D)), rng.lognormal(4, 3, G) * rng.integers(0, 2)
        elif kind == "normal":
            w[i], f[i] = rng.normal(4096, 1200, (G, D)).clip(0), rng.normal(4096 * 6, 3000, G).clip(0)
        elif kind == "sparse":
            w[i] = rng.lognormal(6, 2, (G, D)) * (rng.random((G, D)) < 0.3)
            f[i] = rng.lognormal(6, 2, G) * (rng.random(G) < 0.5)
        elif kind == "hot_expert":
            w[i, rng.integers(G), rng.integers(D)] = rng.integers(1, 1 << 20)
        elif kind == "hot_fixed":
            w[i] = rng.integers(0, 50, (G, D))
            f[i, rng.integers(G)] = rng.integers(1, 1 << 20)
        elif kind == "all_equal":
            w[i], f[i] = 1000, 3000
        elif kind == "no_fixed":
            w[i] = rng.lognormal(5, 1.5, (G, D))
        # "zero" stays zero
    return np.round(np.minimum(w, 1 << 24)), np.round(np.minimum(f, 1 << 24))


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def problem_set(request):
    """A topology, its instances and their HiGHS optima (computed once per module)."""
    r2o = TOPOLOGIES[request.param]()
    G, D = r2o.shape
    rng = np.random.default_rng(sum(map(ord, request.param)))
    w, f = random_instances(rng, N_INSTANCES, G, D)
    optimum = np.array([lp.solve_highs(w[i], f[i], r2o.numpy())[0] for i in range(N_INSTANCES)])
    return request.param, r2o, w, f, optimum


def relative_error(achieved, optimum):
    return np.abs(achieved - optimum) / np.maximum(optimum, 1e-30)


def achieved_max_load(w, f, probs, r2o):
    loads = lp.rank_loads(torch.from_numpy(w), torch.from_numpy(f), torch.as_tensor(probs, dtype=torch.float64), r2o)
    return loads.max(-1).values.numpy()


def test_numba_matches_highs(problem_set):
    name, r2o, w, f, optimum = problem_set
    r2o_np, o2r_np = r2o.numpy(), original_to_redundant(r2o).numpy()
    probs, status, iters, objective = ipm_numba.solve_groups(w, f, r2o_np, o2r_np, np.full(w.shape, 0.5),
                                                             ipm_numba.MAX_ITERATIONS, ipm_numba.TOLERANCE)
    assert (status == ipm_numba.STATUS_OPTIMAL).all(), f"{name}: statuses {np.bincount(status)}"
    assert ((probs >= 0) & (probs <= 1)).all()
    achieved = achieved_max_load(w, f, probs, r2o)
    nonzero = optimum > 0
    assert relative_error(achieved[nonzero], optimum[nonzero]).max() < 1e-4
    assert (achieved[~nonzero] == 0).all()
    np.testing.assert_allclose(objective, achieved, rtol=1e-9, atol=1e-9)  # the reported objective is the plan's
    assert iters.max() <= 2 * ipm_numba.MAX_ITERATIONS  # a numerical failure is solved once more


def test_degenerate_cases_have_known_optima():
    r2o = cube_8p2e()
    r2o_np, o2r_np = r2o.numpy(), original_to_redundant(r2o).numpy()
    w = np.zeros((3, 8, 2))
    f = np.zeros((3, 8))
    w[1] = 100.0                      # all equal: already balanced
    f[1] = 300.0
    w[2, 5, 1] = 800.0                # one hot bundle: rank 5 and its copy holder split it evenly
    probs, status, _, objective = ipm_numba.solve_groups(w, f, r2o_np, o2r_np, np.full(w.shape, 0.5), 50, 1e-6)
    assert status.tolist() == [0, 0, 0]
    assert probs[0].tolist() == np.full((8, 2), 0.5).tolist() and objective[0] == 0.0
    assert objective[1] == pytest.approx(500.0, rel=1e-6)
    assert objective[2] == pytest.approx(400.0, rel=1e-6)
    assert probs[2, 5, 1] == pytest.approx(0.5, abs=1e-5)


def test_failed_group_keeps_its_previous_plan():
    r2o = cube_8p2e()
    rng = np.random.default_rng(5)
    w, f = rng.lognormal(5, 1, (2, 8, 2)), rng.lognormal(6, 1, (2, 8))
    prev = rng.random((2, 8, 2))
    probs, status, iters, _ = ipm_numba.solve_groups(w, f, r2o.numpy(), original_to_redundant(r2o).numpy(), prev,
                                                     1, 1e-6)
    assert (status == ipm_numba.STATUS_ITERATION_LIMIT).all() and (iters == 1).all()
    np.testing.assert_array_equal(probs, prev)


SHAPES = [(8, 2, 1), (8, 2, 2), (16, 2, 1), (8, 1, 1), (32, 2, 1), (3, 1, 1)]  # cube, cube x2, hypercube, ring, torus


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "g{}_d{}_c{}".format(*s))
def test_ipm_kernel_compiles_for_sm90a(shape):
    spec = IpmSpec(*shape)
    assert spec.name.startswith(f"lplb_ipm_g{shape[0]}_d{shape[1]}_c{shape[2]}-")
    assert len(jit.build(spec, "sm_90a").cubin) > 0


def test_ipm_spec_validation():
    with pytest.raises(ValueError, match=r"IpmSpec.group_size=33: must be <= 32"):
        IpmSpec(33, 2)
    with pytest.raises(ValueError, match=r"IpmSpec.dups=0: must be >= 1"):
        IpmSpec(8, 0)
    with pytest.raises(ValueError, match=r"IpmSpec.tolerance=1: expected a float"):
        IpmSpec(8, 2, tolerance=1)


def test_deployment_specs_cover_deepseek_v3_topologies():
    from epkern.deployment import Deployment

    specs = deployment_specs(Deployment(ep_sizes=(4, 8, 16, 32, 64)))
    assert {(s.group_size, s.dups) for s in specs} == {(4, 1), (8, 2), (16, 2)}


@pytest.mark.gpu
def test_gpu_kernel_matches_highs_and_numba(problem_set):
    name, r2o, w, f, optimum = problem_set
    dev = torch.device("cuda")
    wt, ft = torch.from_numpy(w).to(dev, torch.int64), torch.from_numpy(f).to(dev, torch.int64)
    res, counter = solve_batch_cuda(wt, ft, r2o)
    torch.cuda.synchronize()
    status = res.status.cpu().numpy()
    assert (status == 0).all(), f"{name}: statuses {np.bincount(status)}"
    assert int(counter) == N_INSTANCES
    probs = res.probs.cpu().double().numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    achieved = achieved_max_load(w, f, probs, r2o)
    nonzero = optimum > 0
    assert relative_error(achieved[nonzero], optimum[nonzero]).max() < 1e-4
    np.testing.assert_allclose(res.objective.cpu().numpy(), achieved, rtol=1e-5, atol=1e-3)
    # the same algorithm as numba: the same number of iterations on almost every instance
    _, _, iters, _ = ipm_numba.solve_groups(w, f, r2o.numpy(), original_to_redundant(r2o).numpy(),
                                            np.full(w.shape, 0.5), ipm_numba.MAX_ITERATIONS, ipm_numba.TOLERANCE)
    assert (np.abs(res.iterations.cpu().numpy() - iters) <= 1).mean() > 0.99


@pytest.mark.gpu
def test_gpu_failed_group_keeps_previous_plan():
    r2o = cube_8p2e()
    dev = torch.device("cuda")
    rng = np.random.default_rng(7)
    w, f = rng.integers(1, 5000, (4, 8, 2)), rng.integers(1, 5000, (4, 8))
    prev = torch.rand(4, 8, 2, device=dev)
    prev_copy = prev.clone()
    res, counter = solve_batch_cuda(torch.from_numpy(w).to(dev), torch.from_numpy(f).to(dev), r2o, prev,
                                    spec=IpmSpec(8, 2, 1, max_iterations=1))
    torch.cuda.synchronize()
    assert (res.status == ipm_numba.STATUS_ITERATION_LIMIT).all() and int(counter) == 0
    assert torch.equal(res.probs, prev_copy) and torch.equal(prev, prev_copy)
