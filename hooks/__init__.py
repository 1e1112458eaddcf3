"""epkern.hooks: overlap communication of one micro-batch with computation of the others."""
from .scheduler import MicroBatchError, Pending, once, run, run_overlapped, run_serial

__all__ = ["MicroBatchError", "Pending", "once", "run", "run_overlapped", "run_serial"]
