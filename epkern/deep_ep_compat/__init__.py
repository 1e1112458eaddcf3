"""epkern as `deep_ep`: the module that `epkern.install_as_deep_ep()` registers under DeepEP's name.

Exports what DeepEP v1.2.1's `deep_ep` does (Buffer, Config, EventOverlap) plus `topk_idx_t`
(later DeepEP's dtype of topk_idx, torch.int64); `deep_ep.utils` and `deep_ep.buffer` resolve to
the submodules of the same names here. Every object is epkern's own: `deep_ep.Buffer is
epkern.Buffer`.
"""
from ..buffer import Buffer, Config, topk_idx_t
from ..events import EventHandle, EventOverlap
from . import buffer, utils

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "topk_idx_t", "buffer", "utils"]
