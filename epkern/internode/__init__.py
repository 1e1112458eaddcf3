"""Normal mode across nodes: a token crosses the network once per destination node and fans out inside it.

`topology` says which ranks share a node; `routing` is the two-hop plan (pure tensor math, the
same on every device); `torch_backend` runs both hops over torch.distributed collectives, the
portable engine (NCCL between GPUs, gloo on CPU), behind the same backend contract as
`epkern.normal`'s backends. `low_latency` is low-latency mode on the same engine (fixed-size
blocks through one all_to_all_single per call, no host sync; `low_latency_blocks` packs and
unpacks them), which epkern.Buffer uses wherever the NVLink low-latency kernels cannot run.
"""
from .topology import NodeTopology, detect_topology
from .torch_backend import HierarchicalTorchBackend, InternodeHandle

__all__ = ["HierarchicalTorchBackend", "InternodeHandle", "NodeTopology", "detect_topology"]
