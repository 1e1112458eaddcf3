"""epkern.solver: LPLB-style load balancing (topologies, EPLB placement, Planner, IPM)."""
from .eplb import rebalance_experts
from .lp import solve_highs
from .planner import Planner
from .topologies import cube_8p2e, hypercube_16p2e, original_to_redundant, ring, torus_2d, validate_r2o

__all__ = ["Planner", "rebalance_experts", "cube_8p2e", "hypercube_16p2e", "ring", "torus_2d", "validate_r2o",
           "original_to_redundant", "solve_highs"]
