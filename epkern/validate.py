"""Input checks run before any kernel launch: clear errors naming the argument."""
from __future__ import annotations

import torch

from epkern.codegen import knobs


def check_tensor(name: str, t, *, dtype=None, ndim: int | None = None, device: str | torch.device | None = None,
                 contiguous: bool = True, shape: tuple | None = None) -> None:
    """Raise TypeError/ValueError if t is not a tensor of the expected dtype(s), rank, device and shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, (tuple, list)) else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(f"{name}: dtype {t.dtype} not supported; expected {' or '.join(map(str, allowed))}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name}: dimension {i} is {got}, expected {want} (shape {tuple(t.shape)})")
    if device is not None:
        want = torch.device(device)
        if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
            raise ValueError(f"{name}: on {t.device}, expected {want}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")


def check_cuda(name: str, t: torch.Tensor) -> None:
    if not t.is_cuda:
        raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Value checks need a host sync: skipped under CUDA-graph capture or with EPKERN_CHECK_VALUES=0."""
    if not knobs.check_values():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Every value of t in [lo, hi). One host sync for a CUDA tensor."""
    if t.numel() == 0 or not value_checks_enabled(t):
        return
    vmin, vmax = (int(v) for v in torch.stack(torch.aminmax(t)).tolist())
    if vmin < lo or vmax >= hi:
        bad = vmin if vmin < lo else vmax
        raise ValueError(f"{name}: value {bad} out of range; allowed values are in [{lo}, {hi})")


def check_positive_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r}: expected an int >= {lo}")
