"""What the floors take from a GPU's name: the NVLink one-way rate and the dense BF16 peak.

These are the rates the bench cannot measure for itself (the device copy bandwidth it measures:
timing.Bench.copy_bandwidth). A GPU not listed has no such floor (its rows leave it empty).

  NVLINK_ONE_WAY   bytes/s the copy engine reached one way over NVLink on H200 (REFERENCE.md),
                   used for GPUs of the H100/H200 family
  DENSE_BF16_PEAK  FLOP/s of dense BF16 tensor-core math (without sparsity), NVIDIA's datasheets;
                   the first name that is part of the device's name applies
"""
from __future__ import annotations

NVLINK_ONE_WAY = 393e9
NVLINK_FAMILY = ("H100", "H200", "H800", "H20")
DENSE_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                   ("H200", 989e12), ("H800", 989e12), ("H20", 148e12))


def nvlink_floor_bw(device_name: str, shared: bool) -> float | None:
    """The one-way NVLink rate, for one GPU per rank of the H100/H200 family; else None."""
    if shared or not any(n in device_name for n in NVLINK_FAMILY):
        return None
    return NVLINK_ONE_WAY


def dense_bf16_peak(device_name: str) -> float | None:
    """Dense BF16 FLOP/s of the named GPU, or None when it is not listed."""
    for name, peak in DENSE_BF16_PEAK:
        if name in device_name:
            return peak
    return None
