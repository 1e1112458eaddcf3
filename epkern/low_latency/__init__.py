"""Low-latency mode (decode): fixed buffers, no host sync, CUDA-graph safe, receive hooks.

`kernels` owns the spec, the buffer layout and the launchers; `buffer` is the LowLatencyBuffer that
`epkern.Buffer(low_latency_mode=True)` delegates to within one node (`make_low_latency_buffer` picks
it, or epkern.internode.low_latency's collective engine across nodes, without peer access or on
CPU); `handle` the LowLatencyHandle (DeepEP's 5 fields plus epkern's tensors); `logfmt` the CPU
reference and error bound of use_logfmt=True rows.
"""
from .buffer import (LowLatencyBuffer, get_low_latency_rdma_size_hint, make_low_latency_buffer,
                     max_dispatch_tokens_for_bytes)
from .handle import LowLatencyHandle
from .kernels import deployment_skips, deployment_specs

__all__ = ["LowLatencyBuffer", "LowLatencyHandle", "deployment_skips", "deployment_specs",
           "get_low_latency_rdma_size_hint", "make_low_latency_buffer", "max_dispatch_tokens_for_bytes"]
