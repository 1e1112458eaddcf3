"""Normal-mode dispatch payloads: check what DeepEP's dispatch takes, and fit it to the NVLink kernels.

DeepEP's intranode dispatch takes
  x [T, H] of any dtype whose row is a multiple of 16 bytes, or
  (x [T, H] of a 1-byte dtype, scales [T, S] fp32 or int32 of any strides): fp32 per-128-channel
  scales, or packed UE8M0 exponents (int32 [T, ceil(H / 512)], 4 bytes per int);
and returns rows of the same dtypes, with contiguous scales.

The NVLink kernels copy rows and never look at their values, but they are specialized on two row
formats: bf16 rows (any H multiple of 8) and fp8 rows with fp32 [T, H/128] contiguous scales.
`for_nvlink` maps every input onto those formats without touching the kernels:
  2-byte rows (bf16, fp16, int16 ...)       -> viewed as bf16 (the bits travel unchanged)
  other rows without scales (fp32, int8 ...)-> viewed as bytes, then as bf16 [T, row_bytes / 2]
  1-byte rows + fp32/int32 [T, H/128]       -> fp8 rows + fp32 scales (int32 reinterpreted);
                                               strided scales are copied to contiguous (small)
  1-byte rows + any other scale count       -> row and scales packed side by side into one
                                               bf16 row (a copy of x, done here before launch,
                                               since the fp8 kernel carries exactly H/128 scales)
`Payload.restore` turns the received rows back into DeepEP's outputs (views where it can).
The portable (torch) backend carries any row as bytes and takes the input as it is.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..validate import check_tensor

_ONE_BYTE = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8)
_SCALE_DTYPES = (torch.float32, torch.int32)


def check_x(x) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate dispatch's x as DeepEP does; returns (rows, scales or None). Strided rows are made contiguous."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError("x: an FP8 input is the tuple (x [T, H] of a 1-byte dtype, scales [T, S] fp32 or int32)")
        data, scales = x
        check_tensor("x[0]", data, ndim=2, contiguous=False)
        if data.element_size() != 1:
            raise TypeError(f"x[0]: dtype {data.dtype} has {data.element_size()}-byte elements; rows sent with "
                            "scales must have 1-byte elements (float8_e4m3fn, float8_e5m2, int8, uint8)")
        check_tensor("x[1]", scales, dtype=_SCALE_DTYPES, ndim=2, shape=(data.shape[0], None), contiguous=False,
                     device=data.device)
        if scales.shape[1] == 0:
            raise ValueError("x[1]: scales need at least one column")
        _check_row_bytes("x[0]", data)
        return data.contiguous(), scales
    check_tensor("x", x, ndim=2, contiguous=False)
    _check_row_bytes("x", x)
    return x.contiguous(), None


def _check_row_bytes(name: str, x: torch.Tensor) -> None:
    row = x.shape[1] * x.element_size()
    if row == 0 or row % 16:
        raise ValueError(f"{name}: a row is {x.shape[1]} x {x.element_size()} = {row} bytes; dispatch needs a "
                         "positive multiple of 16 bytes (pad the hidden size)")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[T, S] -> contiguous [T, S * element size] uint8. Through 1-D: a [T, 1] column-major view
    (SGLang's UE8M0 scales for H <= 512) counts as contiguous yet keeps a last stride != 1, which
    a dtype view refuses."""
    return t.contiguous().reshape(-1).view(torch.uint8).view(t.shape[0], t.shape[1] * t.element_size())


@dataclasses.dataclass(frozen=True)
class Payload:
    """What the NVLink kernels send, and how to turn what they received back into DeepEP's outputs."""

    x: torch.Tensor                     # bf16 [T, W] or fp8 [T, H]
    scales: torch.Tensor | None         # fp32 [T, H / 128] contiguous (fp8 rows only)
    restore: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


def for_nvlink(x: torch.Tensor, scales: torch.Tensor | None) -> Payload:
    """Fit a checked (x, scales) to the kernels' two row formats (see the module docstring)."""
    T, H = x.shape
    dtype = x.dtype
    if scales is None:
        if x.element_size() == 2:
            if dtype == torch.bfloat16:
                return Payload(x, None, lambda rx, rs: (rx, None))
            return Payload(x.view(torch.bfloat16), None, lambda rx, rs: (rx.view(dtype), None))
        row = H * x.element_size()
        as_bf16 = x.view(torch.uint8).view(T, row).view(torch.bfloat16)
        return Payload(as_bf16, None, lambda rx, rs: (rx.view(torch.uint8).view(dtype).view(rx.shape[0], H), None))

    sdtype = scales.dtype
    if H % 128 == 0 and scales.shape[1] == H // 128:
        # the fp8 kernel's format; the kernel reads scales row by row, so a column-major (or any
        # strided) scales view is copied to a contiguous [T, H/128] first (H/128 floats a token)
        fp8 = x if dtype == torch.float8_e4m3fn else x.view(torch.float8_e4m3fn)
        fp32 = as_bytes(scales).view(torch.float32)

        def restore(rx, rs):
            return (rx if dtype == torch.float8_e4m3fn else rx.view(dtype)), rs.view(sdtype)

        return Payload(fp8, fp32, restore)

    # any other scale count (UE8M0 packs four per int): row bytes and scale bytes in one bf16 row
    S = scales.shape[1]
    row_bytes = H
    scale_bytes = 4 * S
    width = -(-(row_bytes + scale_bytes) // 16) * 16
    packed = torch.zeros(T, width, dtype=torch.uint8, device=x.device)
    packed[:, :row_bytes] = x.view(torch.uint8)
    packed[:, row_bytes:row_bytes + scale_bytes] = as_bytes(scales)

    def unpack(rx, rs):
        raw = rx.view(torch.uint8)
        data = raw[:, :row_bytes].contiguous().view(dtype)
        return data, raw[:, row_bytes:row_bytes + scale_bytes].contiguous().view(sdtype)

    return Payload(packed.view(torch.bfloat16), None, unpack)
