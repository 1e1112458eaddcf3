"""FP8 per-token-group cast (e4m3 + per-group scales) and its inverse.

The rule, per token and per group of `group_size` channels (templates/include/fp8_cast.cuh.j2
implements it on the GPU; `quantize_reference` below is the same steps in torch, bit for bit):

    amax  = max |x| over the group's non-NaN elements (0 if none)
    scale = fp32(max(amax, 1e-4) / 448)                 (correctly rounded)
    round_scale: scale = 2^ceil(log2(scale))            (exact, on the fp32 bits)
    mult  = fp32(448 / max(amax, 1e-4))                 (correctly rounded; DeepEP's payload rule)
    round_scale: mult = fp32(1 / scale)                 (exact: the inverse of a power of two)
    q     = e4m3(fp32(x * mult)), round to nearest even, saturating at +-448
    UE8M0 = the biased fp32 exponent byte of the power-of-two scale, 4 per int32

The multiplier is 448 / amax as in DeepEP's kernels and reference, not 1 / scale: the two differ
in the last bit for many amax, and a product on an e4m3 rounding boundary then moves one code.

NaN: a NaN element does not take part in amax and becomes the e4m3 NaN 0x7F; the other
elements of its group are cast as if it were absent. An infinite element makes the group's
scale inf (UE8M0 byte 0xFF): its finite elements become +-0 and its infinities NaN.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from epkern.codegen import KernelSpec, check_choice, check_int, get_module
from epkern.codegen.launch import current_stream_handle

from .call_plans import fresh_output, store
from .validate import check_tensor

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
GROUP_SIZES = (32, 64, 128)
MAX_HIDDEN = 1 << 16
SCALE_FORMATS = ("fp32", "fp32_pow2", "ue8m0")
SCALE_LAYOUTS = ("row", "col")
TMA_ALIGN_BYTES = 16
MAX_CHUNKS = 1 << 30  # the kernels index 16-channel chunks of [T, H] with int32
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Fp8CastSpec(KernelSpec):
    """One cast / cast-back pair: entries `<symbol>_cast` and `<symbol>_cast_back`.

    `dtype` is the unquantized side (input of the cast, output of the cast-back)."""

    family = "fp8_cast"
    template = "fp8_cast.cu.j2"

    hidden: int
    group_size: int = 128
    dtype: str = "bf16"
    scale_format: str = "fp32"
    scale_layout: str = "row"
    threads: int = 256

    def validate(self) -> None:
        n = type(self).__name__
        check_choice(n, "group_size", self.group_size, GROUP_SIZES)
        check_int(n, "hidden", self.hidden, self.group_size, MAX_HIDDEN, multiple_of=self.group_size)
        check_choice(n, "dtype", self.dtype, tuple(_DTYPES))
        check_choice(n, "scale_format", self.scale_format, SCALE_FORMATS)
        check_choice(n, "scale_layout", self.scale_layout, SCALE_LAYOUTS)
        check_int(n, "threads", self.threads, 32, 1024, multiple_of=32)
        if self.scale_format == "ue8m0" and self.hidden % (4 * self.group_size):
            raise ValueError(f"{n}.hidden={self.hidden}: UE8M0 packs 4 groups per int32, so hidden must be a "
                             f"multiple of 4 * group_size = {4 * self.group_size}")

    def template_vars(self):
        return dict(hidden=self.hidden, group_size=self.group_size, threads=self.threads,
                    ctype=_CTYPES[self.dtype], round_scale=self.scale_format != "fp32",
                    use_ue8m0=self.scale_format == "ue8m0", col_major=self.scale_layout == "col")

    def name_fields(self) -> str:
        fmt = self.scale_format.replace("_", "")
        return f"h{self.hidden}_g{self.group_size}_{self.dtype}_{fmt}_{self.scale_layout}"


# ---- argument checks (before any launch) ---------------------------------------------------------
def _scale_format(round_scale, use_ue8m0) -> str:
    for name, value in (("round_scale", round_scale), ("use_ue8m0", use_ue8m0)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}={value!r}: expected a bool")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 stores power-of-two scales only)")
    return "ue8m0" if use_ue8m0 else ("fp32_pow2" if round_scale else "fp32")


def check_choice_arg(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r}: allowed values are {list(allowed)}")


def _check_hidden(name: str, hidden: int, group_size, ue8m0: bool) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r}: allowed values are {list(GROUP_SIZES)}")
    if hidden < group_size or hidden % group_size or hidden > MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {hidden} must be a multiple of group_size={group_size} "
                         f"between {group_size} and {MAX_HIDDEN}")
    if ue8m0 and hidden % (4 * group_size):
        raise ValueError(f"{name}: hidden size {hidden} must be a multiple of 4 * group_size = {4 * group_size} "
                         "for UE8M0 scales (4 exponent bytes per int32)")


def _check_size(name: str, num_tokens: int, hidden: int) -> None:
    if num_tokens * (hidden // 16) >= MAX_CHUNKS:
        raise ValueError(f"{name}: [{num_tokens}, {hidden}] is too large for one call (T * H must be below "
                         f"{16 * MAX_CHUNKS}); split the tokens into several calls")


def _check_device(name: str, t: torch.Tensor) -> None:
    if not t.is_cuda and t.device.type != "cpu":
        raise ValueError(f"{name}: on {t.device}; expected a CUDA tensor (kernel) or a CPU tensor (reference)")
    if t.dim() == 2 and t.stride()[1] != 1 and t.shape[1] > 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")


def _vector_aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if its rows start on 16-byte boundaries, else an aligned contiguous copy."""
    row_bytes = t.stride(0) * t.element_size()
    if t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or row_bytes % 16 == 0):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


# ---- scale storage ---------------------------------------------------------------------------------
def tma_aligned_rows(num_tokens: int) -> int:
    """Rows of a column-major scale buffer: num_tokens rounded up so each column starts on a
    16-byte boundary (a multiple of 4 for the 4-byte fp32 and packed-int32 scales)."""
    per = TMA_ALIGN_BYTES // 4
    return -(-num_tokens // per) * per


def _empty_scales(num_tokens: int, cols: int, dtype, layout: str, device, fill_zero: bool = False):
    """Logical [T, cols] scales and their leading dimension (row: cols; col: the padded T)."""
    make = torch.zeros if fill_zero else torch.empty
    if layout == "row":
        return make((num_tokens, cols), dtype=dtype, device=device), cols
    ld = tma_aligned_rows(num_tokens)
    return make((cols, ld), dtype=dtype, device=device).t()[:num_tokens], ld


def _to_layout(scales: torch.Tensor, layout: str) -> torch.Tensor:
    out, _ = _empty_scales(scales.shape[0], scales.shape[1], scales.dtype, layout, scales.device, fill_zero=True)
    return out.copy_(scales)


def _read_scale_format(scales: torch.Tensor, num_tokens: int, hidden: int):
    """(ue8m0, group_size, layout, ld) of a scales tensor produced by per_token_cast_to_fp8."""
    check_tensor("scales", scales, dtype=(torch.float32, torch.int32), ndim=2, contiguous=False)
    ue8m0 = scales.dtype == torch.int32
    cols = scales.shape[1]
    per_col = 4 if ue8m0 else 1
    if scales.shape[0] != num_tokens or cols < 1 or hidden % (cols * per_col):
        raise ValueError(f"scales: shape {tuple(scales.shape)} does not fit x_fp8 [{num_tokens}, {hidden}]; expected "
                         f"[{num_tokens}, hidden / group_size] fp32 or [{num_tokens}, hidden / (4 * group_size)] int32")
    group_size = hidden // (cols * per_col)
    _check_hidden("x_fp8", hidden, group_size, ue8m0)
    s0, s1 = scales.stride()
    if cols == 1 or (s1 == 1 and (s0 >= cols or num_tokens <= 1)):
        layout, ld = "row", (s0 if num_tokens > 1 else cols)
    elif s0 == 1 and (s1 >= num_tokens):
        layout, ld = "col", s1
    else:
        raise ValueError(f"scales: strides {scales.stride()} are neither row-major nor column-major")
    if ld >= 1 << 31:
        raise ValueError(f"scales: leading dimension {ld} does not fit in int32")
    return ue8m0, group_size, layout, max(ld, 1)


# ---- the rule on the CPU (also the oracle for the kernels) -----------------------------------------
def _f32(t: torch.Tensor) -> torch.Tensor:
    """float64 -> fp32, correctly rounded: emulates one fp32 operation on exact float64 results."""
    return t.to(torch.float32)


def quantize_reference(x: torch.Tensor, group_size: int, round_scale: bool):
    """(q uint8 [T, H] e4m3 bits, scale fp32 [T, H / group_size]) by the module's rule, any device.

    Every fp32 step is one correctly rounded operation: the exact float64 result (the quotient,
    reciprocal and product of fp32 values are exact or safely double-rounded at 53 bits) rounded
    to fp32, the same as the GPU's __fdiv_rn, __frcp_rn and __fmul_rn."""
    num_tokens, hidden = x.shape
    xf = x.to(torch.float32).reshape(num_tokens, hidden // group_size, group_size)
    magnitude = torch.where(torch.isnan(xf), torch.zeros_like(xf), xf.abs())
    amax = torch.maximum(magnitude.amax(-1), torch.tensor(AMAX_FLOOR, dtype=torch.float32, device=x.device))
    scale = _f32(amax.double() / FP8_MAX)
    if round_scale:
        bits = scale.view(torch.int32)
        rounded = (bits & 0x7F800000) + 0x00800000
        scale = torch.where((bits & 0x007FFFFF) != 0, rounded, bits).view(torch.float32)
    mult = _f32(1.0 / scale.double()) if round_scale else _f32(FP8_MAX / amax.double())
    q = e4m3_bits(_f32(xf.double() * mult.double()[..., None]))
    return q.reshape(num_tokens, hidden), scale


def e4m3_bits(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3 bits (uint8) like cvt.rn.satfinite: nearest even, +-448 beyond range, NaN -> 0x7F.
    torch's cast rounds to nearest even but does not saturate (and keeps a NaN's sign)."""
    q = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(y), torch.full_like(q, 0x7F), q)


def pack_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales [T, G] -> their exponent bytes packed 4 per int32 [T, G / 4]."""
    exponent = (scale.view(torch.int32).to(torch.int64) >> 23) & 0xFF
    e = exponent.reshape(scale.shape[0], scale.shape[1] // 4, 4)   # (not -1: zero tokens)
    words = e[..., 0] | (e[..., 1] << 8) | (e[..., 2] << 16) | (e[..., 3] << 24)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """int32 [T, P] of UE8M0 bytes -> fp32 scales [T, 4P] (byte b -> 2^(b - 127))."""
    shifts = torch.arange(4, device=packed.device, dtype=torch.int64) * 8
    exponent = (packed.to(torch.int64)[..., None] >> shifts) & 0xFF
    bits = torch.where(exponent == 0, torch.full_like(exponent, 0x00400000), exponent << 23)
    return bits.to(torch.int32).view(torch.float32).reshape(packed.shape[0], -1)


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, group_size: int, out_dtype=torch.bfloat16):
    """e4m3 bits (uint8 or float8_e4m3fn) [T, H] and fp32 per-group scales [T, G] -> out_dtype."""
    num_tokens, hidden = q.shape
    qf = q.view(torch.float8_e4m3fn).to(torch.float32).reshape(num_tokens, hidden // group_size, group_size)
    y = _f32(qf.double() * scale.double()[..., None])
    return y.reshape(num_tokens, hidden).to(out_dtype)


# ---- public API --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _max_resident_blocks(device_index: int, threads: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    per_sm = max(1, getattr(props, "max_threads_per_multi_processor", 2048) // threads)
    return props.multi_processor_count * per_sm


@functools.lru_cache(maxsize=1024)
def _spec(hidden: int, group_size: int, dtype: str, scale_format: str, scale_layout: str) -> Fp8CastSpec:
    """One spec object per call signature, so its validation runs once per shape, not per call."""
    return Fp8CastSpec(hidden=hidden, group_size=group_size, dtype=dtype, scale_format=scale_format,
                       scale_layout=scale_layout)


def _grid(spec: Fp8CastSpec, num_tokens: int, device_index: int) -> int:
    chunks = num_tokens * (spec.hidden // 16)
    return max(1, min(-(-chunks // spec.threads), _max_resident_blocks(device_index, spec.threads)))


# ---- the per-signature launch plans ----------------------------------------------------------------
# A call whose (shape, strides, dtype, device, options) key was seen before passed every check then:
# the checks depend on nothing else (the one exception, the input's 16-byte alignment, depends on its
# pointer and is tested per call). Its plan holds the prepared launch (codegen.launch.Launcher); a
# call allocates the fresh outputs and launches. Outputs are never reused: they belong to the caller.
_raw_stream = current_stream_handle
_cast_plans: dict = {}
_back_plans: dict = {}
_PLAN_LIMIT = 1024  # signatures kept per direction (a new token count is a new signature)


def _store(plans: dict, key, plan) -> None:
    if key is not None:
        store(plans, key, plan, _PLAN_LIMIT)


class _CastPlan:
    __slots__ = ("device", "dev", "col", "ld", "num_tokens", "stride0", "launch", "new_out", "new_scales")

    def __init__(self, spec: Fp8CastSpec, x: torch.Tensor, cols: int, scale_dtype):
        num_tokens, hidden = x.shape
        self.device, self.dev = x.device, x.get_device()
        self.num_tokens = num_tokens
        self.col = spec.scale_layout == "col"
        self.ld = tma_aligned_rows(num_tokens) if self.col else cols
        self.stride0 = x.stride(0)
        self.new_out = fresh_output((num_tokens, hidden), torch.float8_e4m3fn, self.device)
        self.new_scales = fresh_output((cols, self.ld) if self.col else (num_tokens, cols), scale_dtype, self.device)
        module = get_module(spec, self.dev)
        self.launch = module.launcher("cast", _grid(spec, num_tokens, self.dev), spec.threads, "pqippi")

    def __call__(self, x: torch.Tensor):
        out = self.new_out()
        scales = self.new_scales()
        if self.col:
            scales = scales.t()[: self.num_tokens]
        self.launch(_raw_stream(self.dev), x.data_ptr(), self.stride0, self.num_tokens, out.data_ptr(),
                    scales.data_ptr(), self.ld)
        return out, scales


class _CastBackPlan:
    __slots__ = ("device", "dev", "ld", "num_tokens", "stride0", "launch", "new_out")

    def __init__(self, spec: Fp8CastSpec, x_fp8: torch.Tensor, ld: int, out_dtype):
        self.device, self.dev = x_fp8.device, x_fp8.get_device()
        self.ld = ld
        self.num_tokens, self.stride0 = x_fp8.shape[0], x_fp8.stride(0)
        self.new_out = fresh_output(x_fp8.shape, out_dtype, self.device)
        module = get_module(spec, self.dev)
        self.launch = module.launcher("cast_back", _grid(spec, self.num_tokens, self.dev), spec.threads, "pqipip")

    def __call__(self, x_fp8: torch.Tensor, scales: torch.Tensor):
        out = self.new_out()
        self.launch(_raw_stream(self.dev), x_fp8.data_ptr(), self.stride0, self.num_tokens, scales.data_ptr(),
                    self.ld, out.data_ptr())
        return out


def per_token_cast_to_fp8(x: torch.Tensor, group_size: int = 128, round_scale: bool = False,
                          use_ue8m0: bool = False, scale_layout: str = "row"):
    """Cast x [T, H] (bf16, fp16 or fp32) to e4m3 per token and per group of `group_size` channels.

    Returns (x_fp8 [T, H] float8_e4m3fn, scales):
      * fp32 scales [T, H / group_size] (powers of two with round_scale=True), or
      * use_ue8m0=True (needs round_scale=True and H % (4 * group_size) == 0): int32 [T, H / (4 * group_size)],
        the exponent bytes of 4 consecutive groups packed little-endian (byte k = group 4p + k).
    scale_layout="row": a contiguous [T, G] tensor. scale_layout="col": the layout TMA-fed FP8 GEMMs
    (DeepGEMM) read: logical shape [T, G], stored column-major with leading dimension
    T_pad = T rounded up to a multiple of 4 (so each column starts 16-byte aligned), i.e. the
    transposed view `buf.t()[:T]` of a [G, T_pad] buffer; strides (1, T_pad); padding rows are
    unspecified. See the module docstring for the rule, NaN and inf. CUDA tensors run the JIT
    kernel on the current stream; CPU tensors run the reference (identical bits).
    """
    try:  # a signature seen before: its checks passed, only the pointers and the stream are new
        key = (x.shape, x.stride(), x.dtype, x.get_device(), group_size, type(group_size), round_scale,
               type(round_scale), use_ue8m0, type(use_ue8m0), scale_layout)
        plan = _cast_plans.get(key)
    except (AttributeError, TypeError):  # not a tensor, an unhashable argument: the checks below say what
        key = plan = None
    if plan is not None and not x.data_ptr() & 15:
        return plan(x)
    check_tensor("x", x, dtype=tuple(_DTYPES.values()), ndim=2, contiguous=False)
    _check_device("x", x)
    scale_format = _scale_format(round_scale, use_ue8m0)
    check_choice_arg("scale_layout", scale_layout, SCALE_LAYOUTS)
    num_tokens, hidden = x.shape
    _check_hidden("x", hidden, group_size, use_ue8m0)
    _check_size("x", num_tokens, hidden)
    cols = hidden // group_size // (4 if use_ue8m0 else 1)
    scale_dtype = torch.int32 if use_ue8m0 else torch.float32

    if not x.is_cuda:
        q, scale = quantize_reference(x, group_size, round_scale)
        scales = pack_ue8m0(scale) if use_ue8m0 else scale
        return q.view(torch.float8_e4m3fn), _to_layout(scales, scale_layout)

    if num_tokens == 0:
        return (torch.empty((0, hidden), dtype=torch.float8_e4m3fn, device=x.device),
                _empty_scales(0, cols, scale_dtype, scale_layout, x.device)[0])
    spec = _spec(hidden, group_size, _NAMES[x.dtype], scale_format, scale_layout)
    aligned = _vector_aligned(x)
    plan = _CastPlan(spec, aligned, cols, scale_dtype)
    if aligned is x:  # a copied input has strides of its own: not this signature's
        _store(_cast_plans, key, plan)
    return plan(aligned)


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Inverse of per_token_cast_to_fp8: x_fp8 [T, H] float8_e4m3fn (or uint8 bits) and its scales, in
    any format it returns (fp32 or UE8M0-packed int32, row or column layout, read from the dtype,
    shape and strides) -> [T, H] out_dtype (bf16 by default; fp16 or fp32), fp32(q * scale) rounded
    to nearest even."""
    try:
        key = (x_fp8.shape, x_fp8.stride(), x_fp8.dtype, x_fp8.get_device(), scales.shape, scales.stride(),
               scales.dtype, scales.get_device(), out_dtype)
        plan = _back_plans.get(key)
    except (AttributeError, TypeError):
        key = plan = None
    if plan is not None and not x_fp8.data_ptr() & 15:
        return plan(x_fp8, scales)
    check_tensor("x_fp8", x_fp8, dtype=(torch.float8_e4m3fn, torch.uint8), ndim=2, contiguous=False)
    _check_device("x_fp8", x_fp8)
    if out_dtype not in _NAMES:
        raise ValueError(f"out_dtype={out_dtype}: allowed values are {list(_NAMES)}")
    num_tokens, hidden = x_fp8.shape
    ue8m0, group_size, layout, ld = _read_scale_format(scales, num_tokens, hidden)
    _check_size("x_fp8", num_tokens, hidden)
    if scales.device != x_fp8.device:
        raise ValueError(f"scales: on {scales.device}, expected {x_fp8.device} like x_fp8")

    if not x_fp8.is_cuda:
        scale = unpack_ue8m0(scales) if ue8m0 else scales
        return dequantize_reference(x_fp8, scale, group_size, out_dtype)

    if num_tokens == 0:
        return torch.empty((0, hidden), dtype=out_dtype, device=x_fp8.device)
    spec = _spec(hidden, group_size, _NAMES[out_dtype], "ue8m0" if ue8m0 else "fp32", layout)
    aligned = _vector_aligned(x_fp8)
    plan = _CastBackPlan(spec, aligned, ld, out_dtype)
    if aligned is x_fp8:
        _store(_back_plans, key, plan)
    return plan(aligned, scales)


def deployment_skips(deployment) -> list[str]:
    """Why deployment_specs builds fewer casts than the six formats x layouts."""
    if deployment.hidden > MAX_HIDDEN:
        return [f"hidden {deployment.hidden} > {MAX_HIDDEN}: no FP8 cast"]
    if deployment.hidden % 128:
        return [f"hidden {deployment.hidden} is not a multiple of 128: no FP8 cast"]
    if deployment.hidden % 512:
        return [f"hidden {deployment.hidden} is not a multiple of 512: no UE8M0 cast"]
    return []


def deployment_specs(deployment) -> list[Fp8CastSpec]:
    """The bf16, 128-channel casts a deployment's hidden size uses: every scale format and layout
    (each spec also holds its bf16 cast-back). None when hidden is not a multiple of 128."""
    specs = []
    for scale_format in SCALE_FORMATS:
        if deployment.hidden % (4 * 128 if scale_format == "ue8m0" else 128) or deployment.hidden > MAX_HIDDEN:
            continue
        specs += [Fp8CastSpec(hidden=deployment.hidden, scale_format=scale_format, scale_layout=layout)
                  for layout in SCALE_LAYOUTS]
    return specs
