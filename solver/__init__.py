"""epkern.solver: LPLB-style load balancing (topologies, EPLB placement, Planner, IPM)."""
