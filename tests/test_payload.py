"""epkern.normal.payload: every input DeepEP's dispatch takes maps onto the NVLink kernels' two row
formats and back, bit for bit (the kernels copy rows: here a row gather stands in for them)."""
import pytest
import torch

from epkern.normal.payload import check_x, for_nvlink


def _rows(t, idx):
    """t[idx] for any dtype (CPU indexing has no fp8): through bytes, flat first (see payload.as_bytes)."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).view(t.shape[0], -1)
    return raw[idx].view(t.dtype).view(len(idx), *t.shape[1:])


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _column_major(t):
    T, S = t.shape
    out = torch.empty(S, -(-T // 4) * 4, dtype=t.dtype).t()[:T]
    out.copy_(t)
    return out


def _cases():
    g = torch.Generator().manual_seed(0)
    T = 37
    bits = lambda shape, dtype: torch.randint(0, 256, (*shape[:-1], shape[-1] * torch.empty((), dtype=dtype)
                                                        .element_size()), dtype=torch.uint8, generator=g).view(dtype)
    f32 = lambda S: torch.rand(T, S, generator=g) + 0.5
    i32 = lambda S: torch.randint(0, 1 << 30, (T, S), generator=g, dtype=torch.int32)
    return {
        "bf16 h2880": (bits((T, 2880), torch.bfloat16), None, "bf16"),
        "fp16": (bits((T, 256), torch.float16), None, "bf16"),
        "fp32": (bits((T, 100), torch.float32), None, "bf16"),
        "int8 rows": (bits((T, 48), torch.int8), None, "bf16"),
        "fp8 + fp32 row-major": (bits((T, 512), torch.float8_e4m3fn), f32(4), "fp8"),
        "fp8 + fp32 column-major": (bits((T, 512), torch.float8_e4m3fn), _column_major(f32(4)), "fp8"),
        "e5m2 + int32 [T, H/128]": (bits((T, 256), torch.float8_e5m2), i32(2), "fp8"),
        "fp8 + UE8M0 column-major": (bits((T, 1024), torch.float8_e4m3fn), _column_major(i32(1)), "bf16"),
        "fp8 + UE8M0 h7168": (bits((T, 7168), torch.float8_e4m3fn), _column_major(i32(14)), "bf16"),
        "fp8 h2880 + 23 scales": (bits((T, 2880), torch.float8_e4m3fn), f32(23), "bf16"),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_round_trip_through_the_kernel_formats(name):
    x, scales, kernel_format = _cases()[name]
    data, s = check_x((x, scales) if scales is not None else x)
    sent = for_nvlink(data, s)
    assert sent.x.dtype == (torch.float8_e4m3fn if kernel_format == "fp8" else torch.bfloat16)
    assert sent.x.is_contiguous() and sent.x.shape[0] == x.shape[0] and sent.x.shape[1] % 8 == 0
    if kernel_format == "fp8":
        assert sent.scales.dtype == torch.float32 and sent.scales.stride() == (x.shape[1] // 128, 1)
    else:
        assert sent.scales is None
    idx = torch.tensor([5, 0, 36, 5, 17, 2])   # what a rank receives, duplicates included
    rx, rs = sent.restore(_rows(sent.x, idx), None if sent.scales is None else _rows(sent.scales, idx))
    assert _same_bits(rx, _rows(x, idx))
    if scales is None:
        assert rs is None
    else:
        assert rs.is_contiguous() and _same_bits(rs, _rows(scales, idx))


def test_check_x_refuses_what_deep_ep_refuses():
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        check_x(torch.zeros(4, 12, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="1-byte elements"):
        check_x((torch.zeros(4, 128, dtype=torch.bfloat16), torch.ones(4, 1)))
    with pytest.raises(TypeError, match="x\\[1\\]: dtype"):
        check_x((torch.zeros(4, 128, dtype=torch.uint8), torch.ones(4, 1, dtype=torch.float16)))
    with pytest.raises(ValueError, match="x\\[1\\]: dimension 0"):
        check_x((torch.zeros(4, 128, dtype=torch.uint8), torch.ones(5, 1)))
    with pytest.raises(ValueError, match="tuple"):
        check_x((torch.zeros(4, 128, dtype=torch.uint8),))
    strided = torch.zeros(256, 4, dtype=torch.bfloat16).t()
    assert check_x(strided)[0].is_contiguous()
