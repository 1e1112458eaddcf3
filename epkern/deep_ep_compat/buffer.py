"""`deep_ep.buffer` under the alias (DeepEP's module holding Buffer)."""
from ..buffer import Buffer, Config
from ..events import EventHandle, EventOverlap
from .utils import check_nvlink_connections

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "check_nvlink_connections"]
