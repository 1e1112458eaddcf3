"""epkern: JIT-compiled expert-parallel kernels for Mixture-of-Experts on NVIDIA GPUs."""
from .layout import get_dispatch_layout

__all__ = ["get_dispatch_layout"]
