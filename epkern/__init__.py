"""epkern: JIT-compiled expert-parallel kernels for Mixture-of-Experts on NVIDIA GPUs."""
from .buffer import Buffer, Config, topk_idx_t
from .deep_ep_compat.alias import install_as_deep_ep
from .events import EventHandle, EventOverlap
from .errors import DeviceCheckError, check_errors
from .fp8 import per_token_cast_back, per_token_cast_to_fp8
from .layout import get_dispatch_layout
from .low_latency import get_low_latency_rdma_size_hint, max_dispatch_tokens_for_bytes

__all__ = [
    "Buffer",
    "Config",
    "DeviceCheckError",
    "EventHandle",
    "EventOverlap",
    "check_errors",
    "get_dispatch_layout",
    "get_low_latency_rdma_size_hint",
    "install_as_deep_ep",
    "max_dispatch_tokens_for_bytes",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "topk_idx_t",
]
