"""epkern.hooks: overlap communication of one micro-batch with computation of another."""
from .scheduler import run_overlapped

__all__ = ["run_overlapped"]
