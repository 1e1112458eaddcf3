"""epkern.solver: LPLB-style load balancing (topologies, EPLB placement, Planner, IPM).

The exact LP reference `epkern.solver.lp.solve_highs` needs SciPy (a test dependency only), so it
is imported from its module where it is used, not exported here."""
from .eplb import rebalance_experts
from .planner import Planner
from .topologies import cube_8p2e, hypercube_16p2e, original_to_redundant, ring, torus_2d, validate_r2o

__all__ = ["Planner", "rebalance_experts", "cube_8p2e", "hypercube_16p2e", "ring", "torus_2d", "validate_r2o",
           "original_to_redundant"]
