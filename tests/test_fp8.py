"""FP8 per-token-group cast: the rule against a brute-force float64 oracle (CPU), every kernel
specialization through NVRTC (CPU), and the kernels against the rule bit for bit (GPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from epkern import fp8
from epkern.codegen import build
from epkern.fp8 import Fp8CastSpec, per_token_cast_back, per_token_cast_to_fp8

LISTED_HIDDEN = sorted(set(range(512, 16384 + 1, 512)) | {2048, 4096, 5120, 6144, 7168})
FORMATS = [(False, False), (True, False), (True, True)]  # (round_scale, use_ue8m0)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# ---- brute-force oracle: the rule element by element in float64 --------------------------------------
def _e4m3_table() -> np.ndarray:
    """Value of each non-negative finite e4m3 code 0..126 (code 127 is NaN)."""
    values = []
    for code in range(127):
        exp, mant = code >> 3, code & 7
        values.append(mant / 8 * 2.0 ** -6 if exp == 0 else (1 + mant / 8) * 2.0 ** (exp - 7))
    return np.array(values)


E4M3 = _e4m3_table()


def f32(v: float) -> float:
    """Round a float64 to the nearest fp32 (the fp32 result of one correctly rounded operation)."""
    return float(np.float32(v))


def oracle_e4m3(y: float) -> int:
    """Nearest e4m3 code, ties to the even code, saturating at +-448, NaN -> 0x7F."""
    if math.isnan(y):
        return 0x7F
    sign = 0x80 if math.copysign(1.0, y) < 0 else 0
    a = min(abs(y), 448.0)
    hi = int(np.searchsorted(E4M3, a))  # first code with value >= a
    if E4M3[hi] == a:
        return sign | hi
    lo = hi - 1
    d_lo, d_hi = a - E4M3[lo], E4M3[hi] - a
    code = lo if d_lo < d_hi or (d_lo == d_hi and lo % 2 == 0) else hi
    return sign | code


def oracle_scale(amax: float, round_scale: bool) -> float:
    scale = f32(max(amax, f32(1e-4)) / 448.0)
    if round_scale and math.isfinite(scale):
        mantissa, exponent = math.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
        scale = scale if mantissa == 0.5 else 2.0 ** exponent
    return scale


def oracle_cast(x: torch.Tensor, group_size: int, round_scale: bool):
    """(codes [T, H] uint8, scales [T, G] float64) from the rule, one element at a time."""
    xs = x.double().numpy()
    num_tokens, hidden = xs.shape
    codes = np.zeros((num_tokens, hidden), dtype=np.uint8)
    scales = np.zeros((num_tokens, hidden // group_size))
    for t in range(num_tokens):
        for g in range(hidden // group_size):
            group = xs[t, g * group_size:(g + 1) * group_size]
            finite = [abs(v) for v in group if not math.isnan(v)]
            amax = max(finite, default=0.0)
            scale = oracle_scale(amax, round_scale)
            # DeepEP's payload rule: times 448 / amax (for a power-of-two scale: its exact inverse)
            mult = f32(1.0 / scale) if round_scale else f32(448.0 / max(amax, f32(1e-4)))
            scales[t, g] = scale
            for i, v in enumerate(group):
                codes[t, g * group_size + i] = oracle_e4m3(f32(v * mult))
    return codes, scales


def row_scales(scales: torch.Tensor) -> torch.Tensor:
    """Any returned scales -> fp32 [T, G] per group (unpacking UE8M0)."""
    return fp8.unpack_ue8m0(scales) if scales.dtype == torch.int32 else scales.float()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def tricky_rows(hidden: int = 512) -> torch.Tensor:
    """fp32 rows covering the corner cases of the rule, one group of 128 per case."""
    gen = torch.Generator().manual_seed(7)
    rows = []
    # every e4m3 value, the midpoints between neighbours (ties), and midpoints +- 1 fp32 ulp,
    # behind a 448 so that scale = 1 and x * inv = x exactly
    mids = (E4M3[1:] + E4M3[:-1]) / 2
    probe = np.concatenate([E4M3, mids, np.nextafter(mids, 0, dtype=np.float64), mids * (1 + 2.0 ** -23)])
    probe = np.concatenate([probe, -probe])
    for start in range(0, len(probe), 127):
        chunk = probe[start:start + 127]
        group = np.concatenate([[448.0], chunk, np.zeros(127 - len(chunk))])
        rows.append(torch.tensor(group, dtype=torch.float32))
    rows.append(torch.zeros(128))                                            # zeros: amax floor
    rows.append(torch.full((128,), -0.0))                                     # negative zeros
    rows.append(torch.cat([torch.tensor([3e4]), torch.randn(127, generator=gen) * 1e-2]))  # one huge value
    rows.append(torch.randn(128, generator=gen) * 1e-6)                       # below the amax floor
    for s in (1e-3, 1e-1, 1.0, 37.0, 1e3):
        rows.append(torch.randn(128, generator=gen) * s)
    rows.append(torch.linspace(-449.0, 449.0, 128) * 1.0001)                   # values near +-448 * scale
    flat = torch.cat(rows)
    pad = (-flat.numel()) % hidden
    return torch.cat([flat, torch.randn(pad, generator=gen)]).reshape(-1, hidden)


# (amax, x) fp32 bit patterns where DeepEP's fp32(x * fp32(448 / amax)) is exactly an e4m3 midpoint
# (25, 232, 58: ties to the even codes 24, 224, 56) while fp32(x * fp32(1 / fp32(amax / 448))), the
# old rule, lands one fp32 ulp above it (26, 240, 60); the last two are bf16 inputs (products 84, 21).
BOUNDARY_CASES = [(0x41061746, 0x3EEF72B4, 24.0), (0x410E804B, 0x3EFE7761, 24.0),
                  (0x3FE1BFB2, 0x3F69CFAF, 224.0), (0x40A7BAF1, 0x402DB87A, 224.0),
                  (0x3FECCBFF, 0x3E7540FF, 56.0), (0x40896320, 0x3F0E4B3D, 56.0),
                  (0x418A0000, 0x404F0000, 80.0), (0x3F800000, 0x3D400000, 20.0)]


def boundary_rows() -> torch.Tensor:
    """fp32 [len(BOUNDARY_CASES), 256]: per row, group 0 = (amax, x, -x, zeros), group 1 its negation."""
    rows = torch.zeros(len(BOUNDARY_CASES), 256)
    for r, (amax_bits, x_bits, _) in enumerate(BOUNDARY_CASES):
        amax, x = (float(np.array([b], dtype=np.uint32).view(np.float32)[0]) for b in (amax_bits, x_bits))
        rows[r, :3] = torch.tensor([amax, x, -x])
        rows[r, 128:131] = -rows[r, :3]
    return rows


def deepep_codes(x: np.ndarray, group_size: int) -> np.ndarray:
    """DeepEP's non-rounded cast in numpy fp32 arithmetic (each op correctly rounded fp32)."""
    xf = x.astype(np.float32).reshape(x.shape[0], -1, group_size)
    amax = np.maximum(np.nanmax(np.abs(xf), axis=-1), np.float32(1e-4)).astype(np.float32)
    mult = (np.float32(448.0) / amax).astype(np.float32)
    prod = (xf * mult[..., None]).astype(np.float32)
    return fp8.e4m3_bits(torch.from_numpy(prod.reshape(x.shape))).numpy()


def random_rows(num_tokens: int, hidden: int, dtype, seed: int) -> torch.Tensor:
    """Rows with per-row magnitudes from 1e-3 to 1e3, a zero row and an outlier."""
    gen = torch.Generator().manual_seed(seed)
    row_scale = 10.0 ** (torch.rand(num_tokens, 1, generator=gen) * 6 - 3)
    x = torch.randn(num_tokens, hidden, generator=gen) * row_scale
    if num_tokens > 2:
        x[1] = 0
        x[2, hidden // 3] = 1e4
    return x.to(dtype)


# ---- the CPU reference against the oracle ----------------------------------------------------------------
def test_e4m3_rounding_matches_oracle_everywhere():
    """Every e4m3 value, every midpoint and its fp32 neighbours, beyond-range values, inf and NaN."""
    mids = (E4M3[1:] + E4M3[:-1]) / 2
    pos = np.concatenate([E4M3, mids, E4M3[-1] + 16 * np.arange(1, 5), [2.0 ** -10, 3e38, np.inf]])
    pos = np.concatenate([pos, [np.float32(v) for v in pos]])
    y32 = np.concatenate([pos, np.nextafter(pos.astype(np.float32), np.float32(0)),
                          np.nextafter(pos.astype(np.float32), np.float32(np.inf))]).astype(np.float32)
    y32 = np.concatenate([y32, -y32, [np.nan, -np.nan]]).astype(np.float32)
    got = fp8.e4m3_bits(torch.from_numpy(y32)).numpy()
    assert np.array_equal(got, np.array([oracle_e4m3(float(v)) for v in y32], dtype=np.uint8))


@pytest.mark.parametrize("round_scale", [False, True])
def test_reference_matches_oracle_on_tricky_values(round_scale):
    x = tricky_rows()
    q, scale = fp8.quantize_reference(x, 128, round_scale)
    codes, scales = oracle_cast(x, 128, round_scale)
    assert torch.equal(scale.double(), torch.from_numpy(scales))
    assert np.array_equal(q.numpy(), codes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 128])
def test_reference_matches_oracle_on_random_rows(dtype, group_size):
    x = random_rows(6, 512, dtype, seed=group_size)
    for round_scale in (False, True):
        q, scale = fp8.quantize_reference(x, group_size, round_scale)
        codes, scales = oracle_cast(x, group_size, round_scale)
        assert torch.equal(scale.double(), torch.from_numpy(scales))
        assert np.array_equal(q.numpy(), codes)


def test_payload_follows_deepep_at_rounding_boundaries():
    """x * 448 / amax on an e4m3 midpoint ties to the even code, as DeepEP's cast does (issue 18)."""
    x = boundary_rows()
    q, scale = fp8.quantize_reference(x, 128, False)
    values = q.view(torch.float8_e4m3fn).float()
    for r, (_, _, want) in enumerate(BOUNDARY_CASES):
        assert values[r, :3].tolist() == [448.0, want, -want], f"case {r}"
        assert values[r, 128:131].tolist() == [-448.0, -want, want], f"case {r}"
    assert np.array_equal(q.numpy(), deepep_codes(x.numpy(), 128))
    # the scales stay amax / 448, correctly rounded
    amax = x[:, 0].double()
    assert torch.equal(scale[:, 0], (amax / 448).float()) and torch.equal(scale[:, 1], scale[:, 0])
    # bf16 rows of the same kind go through the same rule
    bf = x[-2:].to(torch.bfloat16)
    assert torch.equal(bf.float(), x[-2:])
    assert torch.equal(fp8.quantize_reference(bf, 128, False)[0], q[-2:])


def test_payload_matches_deepep_on_every_bf16_pair():
    """Every bf16 amax in [1, 4) against every bf16 x in [2^-8, amax]: 51 of them sit on a midpoint."""
    amaxes = torch.arange(0x3F80, 0x4080, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    xs = torch.arange(0x3B80, 0x4080, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    groups = []
    for a in amaxes.tolist():
        below = xs[xs <= a]
        below = torch.cat([below, torch.zeros((-len(below)) % 127)]).reshape(-1, 127)
        groups.append(torch.cat([torch.full((len(below), 1), a), below], dim=1))
    x = torch.cat(groups).reshape(-1, 128).to(torch.bfloat16)
    q, _ = fp8.quantize_reference(x, 128, False)
    assert np.array_equal(q.numpy(), deepep_codes(x.float().numpy(), 128))


@pytest.mark.parametrize("round_scale", [False, True])
def test_power_of_two_scales_agree_with_deepep_exponent(round_scale):
    """DeepEP rounds fp32(amax * fp32(1 / 448)) up to a power of two; ours rounds fp32(amax / 448):
    the exponents agree for every amax of a binade (and so do the payloads, times 2^-e)."""
    bits = np.arange(1 << 23, dtype=np.uint32)[::7] | np.uint32(130 << 23)
    amax = bits.view(np.float32)
    x = torch.from_numpy(np.stack([amax] * 128, axis=1)[:, :128].copy())
    _, scale = fp8.quantize_reference(x, 128, True)
    theirs = (amax * np.float32(1 / 448.0)).astype(np.float32).view(np.uint32)
    exp = (theirs >> 23).astype(np.int64) + ((theirs & 0x7FFFFF) != 0)
    assert np.array_equal((scale[:, 0].numpy().view(np.uint32) >> 23).astype(np.int64), exp)


def test_nan_is_skipped_by_amax_and_becomes_e4m3_nan():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 256, generator=gen) * 5
    x[0, 5] = float("nan")
    x[0, 200] = -float("nan")
    x[1, :128] = float("nan")  # a group of NaN only: amax falls to the floor
    q, scale = fp8.quantize_reference(x, 128, False)
    clean = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    q_clean, scale_clean = fp8.quantize_reference(clean, 128, False)
    assert torch.equal(scale, scale_clean)
    nan = torch.isnan(x)
    assert torch.all(q[nan] == 0x7F)
    assert torch.equal(q[~nan], q_clean[~nan])
    assert scale[1, 0] == np.float32(1e-4) / np.float32(448)
    codes, _ = oracle_cast(x, 128, False)
    assert np.array_equal(q.numpy(), codes)


def test_inf_makes_an_infinite_scale():
    x = torch.randn(1, 512)
    x[0, 3] = float("inf")
    x[0, 4] = -2.0
    q, scale = fp8.quantize_reference(x, 128, True)
    assert math.isinf(scale[0, 0]) and math.isfinite(scale[0, 1])
    assert q[0, 3] == 0x7F and q[0, 4] == 0x80 and q[0, 5] in (0x00, 0x80)
    packed = fp8.pack_ue8m0(scale)
    assert (int(packed[0, 0]) & 0xFF) == 0xFF


def test_round_scale_gives_the_next_power_of_two():
    amax = torch.tensor([[448.0, 449.0, 896.0, 1e-4, 1e-6, 3.0, 100.0, 447.9]])
    x = torch.zeros(8, 128)
    x[:, 0] = amax[0]
    _, scale = fp8.quantize_reference(x, 128, True)
    for a, s in zip(amax[0].tolist(), scale[:, 0].tolist()):
        exact = max(a, float(np.float32(1e-4))) / 448
        assert s >= exact and s / 2 < exact and math.frexp(s)[0] == 0.5


def test_ue8m0_packing_round_trips():
    gen = torch.Generator().manual_seed(0)
    scale = 2.0 ** torch.randint(-40, 40, (5, 16), generator=gen).float()
    packed = fp8.pack_ue8m0(scale)
    assert packed.shape == (5, 4) and packed.dtype == torch.int32
    assert torch.equal(fp8.unpack_ue8m0(packed), scale)
    word = int(packed[0, 0]) & 0xFFFFFFFF
    for k in range(4):  # little-endian, group order
        assert (word >> (8 * k)) & 0xFF == int(math.log2(scale[0, k])) + 127
    assert fp8.unpack_ue8m0(torch.tensor([[0]], dtype=torch.int32))[0, 0] == 2.0 ** -127


# ---- public API on CPU tensors -----------------------------------------------------------------------------
@pytest.mark.parametrize("round_scale,use_ue8m0", FORMATS)
@pytest.mark.parametrize("layout", ["row", "col"])
def test_formats_and_layouts(round_scale, use_ue8m0, layout):
    x = random_rows(5, 1024, torch.bfloat16, seed=11)
    q, scales = per_token_cast_to_fp8(x, 128, round_scale, use_ue8m0, layout)
    codes, oracle_scales = oracle_cast(x, 128, round_scale)
    assert q.dtype == torch.float8_e4m3fn and np.array_equal(bits(q).numpy(), codes)
    cols = 1024 // 128 // (4 if use_ue8m0 else 1)
    assert scales.shape == (5, cols)
    assert scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
    if layout == "col":
        assert scales.stride() == (1, 8)  # 5 tokens padded to 8 rows
    else:
        assert scales.is_contiguous()
    assert torch.equal(row_scales(scales).double(), torch.from_numpy(oracle_scales))


@pytest.mark.parametrize("num_tokens,padded", [(1, 4), (3, 4), (4, 4), (5, 8), (130, 132)])
def test_col_layout_padding_rule(num_tokens, padded):
    assert fp8.tma_aligned_rows(num_tokens) == padded
    _, scales = per_token_cast_to_fp8(torch.randn(num_tokens, 512), scale_layout="col")
    assert scales.shape == (num_tokens, 4) and scales.stride() == (1, padded)
    assert scales.data_ptr() % 16 == 0 and (scales.stride(1) * 4) % 16 == 0


@pytest.mark.parametrize("round_scale,use_ue8m0", FORMATS)
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_cast_back_accepts_every_format(round_scale, use_ue8m0, layout, out_dtype):
    x = random_rows(7, 2048, torch.float32, seed=5)
    q, scales = per_token_cast_to_fp8(x, 128, round_scale, use_ue8m0, layout)
    y = per_token_cast_back(q, scales, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    codes, oracle_scales = oracle_cast(x, 128, round_scale)
    decoded = torch.from_numpy(np.where(codes & 0x80, -1.0, 1.0) * E4M3[np.minimum(codes & 0x7F, 126)])
    expected = (decoded.reshape(7, 16, 128) * torch.from_numpy(oracle_scales)[..., None]).float().to(out_dtype)
    assert torch.equal(y, expected.reshape(7, 2048))
    check_round_trip_error(x, y, row_scales(scales), 128)


def check_round_trip_error(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, group_size: int) -> None:
    """|y - x| <= 2^-4 |x| (e4m3 normal, half an ulp) + 2^-10 scale (e4m3 subnormal step / 2), plus
    the output dtype's own rounding."""
    x64, y64 = x.double(), y.double()
    s = scale.double().repeat_interleave(group_size, dim=1)
    out_eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[y.dtype]
    bound = (2.0 ** -4 + out_eps * 1.1) * x64.abs() + 2.0 ** -10 * s * (1 + out_eps)
    assert torch.all((y64 - x64).abs() <= bound)


def test_cast_back_reads_strided_inputs():
    x = random_rows(6, 1024, torch.bfloat16, seed=2)
    q, scales = per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True, scale_layout="col")
    wide = torch.zeros(6, 2048, dtype=torch.uint8)
    wide[:, :1024] = bits(q)
    y = per_token_cast_back(wide[:, :1024], scales)
    assert torch.equal(y, per_token_cast_back(q, scales))


def test_empty_input():
    for layout in ("row", "col"):
        q, s = per_token_cast_to_fp8(torch.empty(0, 512, dtype=torch.bfloat16), scale_layout=layout)
        assert q.shape == (0, 512) and s.shape == (0, 4)
        assert per_token_cast_back(q, s).shape == (0, 512)


@pytest.mark.parametrize("call,error,match", [
    (lambda: per_token_cast_to_fp8(torch.randn(4, 512).to(torch.int32)), TypeError, "dtype"),
    (lambda: per_token_cast_to_fp8(torch.randn(512)), ValueError, "2-D"),
    (lambda: per_token_cast_to_fp8(torch.randn(2, 4, 512)), ValueError, "2-D"),
    (lambda: per_token_cast_to_fp8(torch.randn(4, 500)), ValueError, "multiple of group_size"),
    (lambda: per_token_cast_to_fp8(torch.randn(4, 512), group_size=100), ValueError, "group_size"),
    (lambda: per_token_cast_to_fp8(torch.randn(4, 512), use_ue8m0=True), ValueError, "round_scale"),
    (lambda: per_token_cast_to_fp8(torch.randn(4, 640), round_scale=True, use_ue8m0=True), ValueError, "4 \\* group"),
    (lambda: per_token_cast_to_fp8(torch.randn(4, 512), scale_layout="k"), ValueError, "scale_layout"),
    (lambda: per_token_cast_to_fp8(torch.randn(512, 4).t()), ValueError, "contiguous"),
    (lambda: per_token_cast_to_fp8(torch.randn(4, 1 << 17)), ValueError, "between"),
    (lambda: per_token_cast_to_fp8(torch.randn(4, 512), round_scale=1), TypeError, "bool"),
    (lambda: per_token_cast_back(torch.zeros(4, 512), torch.ones(4, 4)), TypeError, "dtype"),
    (lambda: per_token_cast_back(torch.zeros(4, 512, dtype=torch.uint8), torch.ones(3, 4)), ValueError, "shape"),
    (lambda: per_token_cast_back(torch.zeros(4, 512, dtype=torch.uint8), torch.ones(4, 3)), ValueError, "shape"),
    (lambda: per_token_cast_back(torch.zeros(4, 512, dtype=torch.uint8), torch.ones(4, 4, dtype=torch.float64)),
     TypeError, "dtype"),
    (lambda: per_token_cast_back(torch.zeros(4, 512, dtype=torch.uint8), torch.ones(8, 8)[::2, ::2]),
     ValueError, "strides"),
    (lambda: per_token_cast_back(torch.zeros(4, 512, dtype=torch.uint8), torch.ones(4, 4), torch.int8),
     ValueError, "out_dtype"),
])
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- kernel specs: render and compile through NVRTC (no GPU needed) ----------------------------------
def test_spec_validates_and_names_itself():
    spec = Fp8CastSpec(hidden=7168, scale_format="ue8m0", scale_layout="col")
    assert spec.symbol == "fp8_cast_h7168_g128_bf16_ue8m0_col"
    with pytest.raises(ValueError, match="group_size"):
        Fp8CastSpec(hidden=7168, group_size=100)
    with pytest.raises(ValueError, match="hidden"):
        Fp8CastSpec(hidden=7000)
    with pytest.raises(ValueError, match="4 \\* group_size"):
        Fp8CastSpec(hidden=640, scale_format="ue8m0")
    source = spec.render()
    assert "epk_fp8_cast_group" in source and f"{spec.symbol}_cast_back" in source


@pytest.mark.parametrize("hidden", LISTED_HIDDEN)
def test_every_listed_hidden_size_compiles(hidden):
    entry = build(Fp8CastSpec(hidden=hidden), arch="sm_90a")
    assert entry.cubin.startswith(b"\x7fELF")
    for name in (b"_cast\x00", b"_cast_back\x00"):
        assert f"fp8_cast_h{hidden}_g128_bf16_fp32_row".encode() + name in entry.cubin


@pytest.mark.parametrize("hidden,group_size", [(512, 32), (2048, 64), (7168, 128), (16384, 128)])
def test_format_layout_dtype_matrix_compiles(hidden, group_size):
    for dtype in ("bf16", "fp16", "fp32"):
        for scale_format in fp8.SCALE_FORMATS:
            for layout in fp8.SCALE_LAYOUTS:
                spec = Fp8CastSpec(hidden=hidden, group_size=group_size, dtype=dtype, scale_format=scale_format,
                                   scale_layout=layout)
                assert build(spec, arch="sm_90a").cubin.startswith(b"\x7fELF")


def test_deployment_specs():
    from epkern.deployment import Deployment

    specs = fp8.deployment_specs(Deployment())
    assert len(specs) == 6 and all(s.hidden == 7168 for s in specs)
    assert fp8.deployment_specs(Deployment(hidden=2880)) == []


# ---- GPU: the kernels against the reference, bit for bit ---------------------------------------------
def assert_same_cast(x: torch.Tensor, group_size: int, round_scale: bool, use_ue8m0: bool, layout: str) -> None:
    q, scales = per_token_cast_to_fp8(x, group_size, round_scale, use_ue8m0, layout)
    q_ref, scales_ref = per_token_cast_to_fp8(x.cpu(), group_size, round_scale, use_ue8m0, layout)
    assert torch.equal(bits(q).cpu(), bits(q_ref))
    assert scales.shape == scales_ref.shape and scales.stride() == scales_ref.stride()
    assert torch.equal(scales.cpu().view(torch.int32), scales_ref.view(torch.int32))
    y = per_token_cast_back(q, scales)
    y_ref = per_token_cast_back(q_ref, scales_ref)
    y, nan = y.cpu(), torch.isnan(y_ref)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(bits(y[~nan]), bits(y_ref[~nan]))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,hidden", [(1, 7168), (3, 512), (128, 7168), (1000, 2048), (4096, 7168),
                                               (8192, 16384), (257, 5120), (33, 6144), (64, 15872)])
@pytest.mark.parametrize("round_scale,use_ue8m0", FORMATS)
@pytest.mark.parametrize("layout", ["row", "col"])
def test_gpu_cast_matches_reference(num_tokens, hidden, round_scale, use_ue8m0, layout):
    x = random_rows(num_tokens, hidden, torch.bfloat16, seed=num_tokens).cuda()
    assert_same_cast(x, 128, round_scale, use_ue8m0, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gpu_dtypes_and_group_sizes(dtype, group_size):
    x = random_rows(300, 4096, dtype, seed=group_size).cuda()
    for round_scale, use_ue8m0 in FORMATS:
        for layout in ("row", "col"):
            assert_same_cast(x, group_size, round_scale, use_ue8m0, layout)
    q, scales = per_token_cast_to_fp8(x, group_size)
    y = per_token_cast_back(q, scales, out_dtype=dtype)
    assert torch.equal(bits(y).cpu(), bits(per_token_cast_back(q.cpu(), scales.cpu(), out_dtype=dtype)))


@pytest.mark.gpu
@pytest.mark.parametrize("round_scale", [False, True])
def test_gpu_tricky_values_nan_and_inf(round_scale):
    x = tricky_rows()
    x[0, 130] = float("nan")
    x[1, 300:428] = float("nan")
    x[2, 5] = float("inf")
    x[3, 7] = -float("nan")
    assert_same_cast(x.cuda(), 128, round_scale, False, "row")
    assert_same_cast(x.cuda(), 128, round_scale, round_scale, "col")
    assert_same_cast(x.cuda().to(torch.bfloat16), 128, round_scale, False, "row")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_payload_follows_deepep_at_rounding_boundaries(dtype):
    x = boundary_rows() if dtype == torch.float32 else boundary_rows()[-2:].to(dtype)
    for layout in ("row", "col"):
        q, _ = per_token_cast_to_fp8(x.cuda(), 128, False, False, layout)
        assert np.array_equal(bits(q).cpu().numpy(), deepep_codes(x.float().numpy(), 128))
        assert_same_cast(x.cuda(), 128, False, False, layout)
        assert_same_cast(x.cuda(), 128, True, False, layout)
        # UE8M0 packs 4 groups per int32: rows of 512
        assert_same_cast(torch.cat([x, x], dim=1).cuda(), 128, True, True, layout)


@pytest.mark.gpu
def test_gpu_round_trip_error_bound():
    x = random_rows(2048, 7168, torch.bfloat16, seed=9).cuda()
    for round_scale, use_ue8m0 in FORMATS:
        q, scales = per_token_cast_to_fp8(x, 128, round_scale, use_ue8m0, "col")
        y = per_token_cast_back(q, scales)
        check_round_trip_error(x.float().cpu(), y.cpu(), row_scales(scales.cpu()), 128)


@pytest.mark.gpu
def test_gpu_strided_and_unaligned_inputs():
    base = random_rows(65, 4096 + 8, torch.bfloat16, seed=4).cuda()
    strided = base[:, :4096]                                     # row stride 4104: rows 16-byte aligned
    offset = base[1:, 8:]                                        # storage offset of 16 bytes: aligned
    misaligned = base.flatten()[1:1 + 64 * 4096].view(64, 4096)  # 2 bytes off: copied before the launch
    for x in (strided, offset, misaligned):
        assert_same_cast(x, 128, True, True, "col")
    q, scales = per_token_cast_to_fp8(strided)
    wide = torch.zeros(65, 4096 + 16, dtype=torch.uint8, device="cuda")
    wide[:, 16:] = bits(q)
    assert torch.equal(per_token_cast_back(wide[:, 16:], scales), per_token_cast_back(q, scales))


@pytest.mark.gpu
def test_gpu_empty_input_and_graph_capture():
    q, s = per_token_cast_to_fp8(torch.empty(0, 7168, device="cuda", dtype=torch.bfloat16), scale_layout="col")
    assert q.shape == (0, 7168) and s.shape == (0, 56)
    x = random_rows(128, 7168, torch.bfloat16, seed=1).cuda()
    per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True, scale_layout="col")  # compile and load first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True, scale_layout="col")
    x.copy_(random_rows(128, 7168, torch.bfloat16, seed=2).cuda())
    graph.replay()
    torch.cuda.synchronize()
    q_ref, s_ref = per_token_cast_to_fp8(x.cpu(), round_scale=True, use_ue8m0=True, scale_layout="col")
    assert torch.equal(bits(q).cpu(), bits(q_ref)) and torch.equal(s.cpu(), s_ref)
