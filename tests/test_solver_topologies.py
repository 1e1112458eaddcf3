"""Topologies: LPLB's matrices, generated rings and tori, and the r2o validation errors."""
import pytest
import torch

from epkern.solver import cube_8p2e, hypercube_16p2e, original_to_redundant, ring, torus_2d, validate_r2o


def test_named_topologies_match_lplb_columns():
    assert cube_8p2e().T.tolist() == [[3, 0, 1, 2, 7, 4, 5, 6], [6, 7, 4, 5, 0, 1, 2, 3]]
    assert hypercube_16p2e().T.tolist() == [[3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14],
                                            [12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert ring(8).T.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    t = torus_2d(8, 4)
    assert t.shape == (32, 2)
    for i in range(8):
        for j in range(4):
            assert t[i * 4 + j].tolist() == [((i + 1) % 8) * 4 + j, i * 4 + (j + 1) % 4]


@pytest.mark.parametrize("r2o", [cube_8p2e(), hypercube_16p2e(), ring(8), ring(3), torus_2d(8, 4), torus_2d(2, 3)])
def test_valid_topologies_pass_and_invert(r2o):
    checked = validate_r2o(r2o)
    assert checked.dtype == torch.int32 and torch.equal(checked, r2o.int())
    o2r = original_to_redundant(checked)
    for g in range(r2o.shape[0]):
        for d in range(r2o.shape[1]):
            assert int(checked[int(o2r[g, d]), d]) == g  # the copy of (g, d) points back at g


@pytest.mark.parametrize("bad, error, match", [
    ([1, 2, 0], ValueError, r"shape \[group_size, dups\]"),
    ([[1], [2], [1]], ValueError, r"permutation.*copied twice \[1\].*never copied \[0\]"),
    ([[0], [0]], ValueError, r"\[0, 0\] = 0: a rank cannot hold the copy of its own bundle"),
    ([[1], [5]], ValueError, r"values must be rank indices in \[0, 2\)"),
    ([[-1], [0]], ValueError, r"rank indices"),
    ([[0]], ValueError, r"group_size=1 must be in \[2, 32\]"),
])
def test_bad_topologies_raise_clear_errors(bad, error, match):
    with pytest.raises(error, match=match):
        validate_r2o(torch.tensor(bad))


def test_bad_topology_types():
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        validate_r2o([[1], [0]])
    with pytest.raises(TypeError, match="integer tensor"):
        validate_r2o(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="group_size=33"):
        validate_r2o(ring(33))
    with pytest.raises(ValueError, match=r"ring\(n=1\)"):
        ring(1)
    with pytest.raises(ValueError, match=r"torus_2d\(m=1\)"):
        torus_2d(1, 4)
