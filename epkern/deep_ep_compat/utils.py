"""`deep_ep.utils` under the alias: EventOverlap, EventHandle, check_nvlink_connections."""
from __future__ import annotations

import torch

from ..events import EventHandle, EventOverlap
from ..peer_memory import peer_access_everywhere

__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]


def check_nvlink_connections(group) -> None:
    """DeepEP's check that the group's GPUs reach each other; raises RuntimeError if one cannot
    map another's memory (collective: every rank must call it). DeepEP asserts NVLink through NVML
    for PCIe GPUs only; epkern asks CUDA whether each pair has peer access, for every GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("check_nvlink_connections: no CUDA device")
    if not peer_access_everywhere(group, torch.cuda.current_device()):
        raise RuntimeError("check_nvlink_connections: some GPU of the group cannot access another as a peer "
                           "(the NVLink kernels need every pair; Buffer(backend='torch') works over any group)")
