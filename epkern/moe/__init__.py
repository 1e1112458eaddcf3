"""epkern.moe: a reference MoE layer (router, optional LPLB planner, FP8 dispatch, grouped-GEMM
experts, shared expert, combine) written as stages for epkern.hooks' overlap scheduler."""
from .experts import dense_mlp, experts_low_latency, experts_normal, fast_grouped_mm, grouped_linear, mlp
from .layer import MoE
from .routing import route

__all__ = ["MoE", "dense_mlp", "experts_low_latency", "experts_normal", "fast_grouped_mm", "grouped_linear",
           "mlp", "route"]
