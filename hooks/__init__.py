"""epkern.hooks: overlap communication of one micro-batch with computation of another."""
