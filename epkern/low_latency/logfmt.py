"""LogFMT-10: the combine rows' wire format with use_logfmt=True, and its CPU reference.

DeepEP's low-latency combine can send bf16 rows as "LogFMT": per group of 128 channels, each
value becomes a sign bit and a 9-bit code on a logarithmic grid between the group's smallest and
largest magnitude (10 bits instead of 16). epkern's combine encodes the same way (the partial row
each expert rank sends back, after its bf16 rounding) with its own packing:

- group statistics: amax, amin = the largest and smallest |x| of the group's 128 bf16 values;
  log_amax = log2(amax), log_amin = max(log2(amin), log_amax - 32) (a zero amin clips too);
- a group is encoded only when amax < 1 and log_amin < log_amax (DeepEP's rule); any other group,
  and the hidden % 128 channels past the last full group, travel as bf16, unchanged;
- step = (log_amax - log_amin) / 510; code 0 is zero, code c in 1..511 is 2^((c - 1) * step + log_amin),
  so code 1 is the group's (clipped) amin and code 511 its amax;
- encoding picks the nearest code in the linear domain (the threshold between two neighbouring codes
  is their arithmetic mean): c = floor(max((log2|x| - log_amin) / step + 2 - log2((1 + 2^step) / 2) / step, 0)).

Error bound (per value of an encoded group, before the receiver's fp32 sum and bf16 rounding):

    |decode(encode(x)) - x| <= (eps(step) + 2^-14) * |x| + 2^-32 * amax,   eps(step) = (2^step - 1) / (2^step + 1)

eps is the exact format's: at most (2^(32/510) - 1) / (2^(32/510) + 1) = 0.02175 (a group spanning the
full 2^32 range), shrinking with the group's range: 0.0054 for a range of 2^8, 0.0007 for 2^1. The
2^-32 * amax term covers values below the clipped amin (they become 0 or amin). The 2^-14 covers the
arithmetic: fp32 rounding of the log2-domain arguments (up to |log2 amin| ~ 133, 2^-16 ulp) and the
hardware lg2.approx / ex2.approx the GPU uses (~2^-22), a few 1e-6 of |x| in the worst case.
Zeros stay exactly zero; groups not encoded are exact.

Wire format of one combine row (message_bytes(hidden) at most, as many bytes as the row needs):
[meta: one uint32 per full group, amax bf16 bits | amin bf16 bits << 16, padded to 16 bytes]
[group g at meta + 256 g: 160 bytes if encoded, else its 256 bf16 bytes][tail: bf16 at meta + 256 G].
An encoded group is 16 units of 8 values, unit j at byte 10 j: an 80-bit little-endian word holding
code k at bits 9k..9k+8 (k < 8) and the sign of value k at bit 72 + k.
"""
from __future__ import annotations

import torch

GROUP = 128            # channels per group (DeepEP's kernel)
CODE_BITS = 9          # magnitude bits; one more for the sign
NUM_STEPS = 510        # codes 1..511 span [amin, amax]
MIN_CLIP = 32.0        # log2 range kept below amax
UNIT = 8               # values per packed unit (one 16-byte bf16 vector)
UNIT_BYTES = 10        # 8 x (9 + 1) bits
ENCODED_GROUP_BYTES = GROUP // UNIT * UNIT_BYTES    # 160, against 256 in bf16
MAX_EPS = (2 ** (MIN_CLIP / NUM_STEPS) - 1) / (2 ** (MIN_CLIP / NUM_STEPS) + 1)   # 0.02175
APPROX_REL = 2.0 ** -14   # fp32 log2-domain rounding and the hardware log2/exp2 approximations, relative


def num_groups(hidden: int) -> int:
    return hidden // GROUP


def meta_bytes(hidden: int) -> int:
    """Bytes of the per-group statistics at the head of a LogFMT row (16-byte aligned)."""
    return 16 * -(-4 * num_groups(hidden) // 16)


def message_bytes(hidden: int) -> int:
    """The most bytes a LogFMT combine row takes (every group left bf16): the slot it needs."""
    return meta_bytes(hidden) + 2 * hidden


def eps(step: torch.Tensor | float):
    """Largest relative error of nearest-in-linear-domain rounding on a grid of ratio 2^step."""
    if isinstance(step, torch.Tensor):
        r = torch.exp2(step)
        return (r - 1) / (r + 1)
    r = 2.0 ** step
    return (r - 1) / (r + 1)


def _group_stats(x: torch.Tensor):
    """(amax, amin, log_amax, log_amin, encoded, step) per full group of x [N, H] bf16, all fp32 [N, G]."""
    n, hidden = x.shape
    g = num_groups(hidden)
    a = x[:, :g * GROUP].float().abs().view(n, g, GROUP)
    a = torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)   # a NaN keeps its group bf16 (amax = inf)
    amax, amin = a.amax(-1), a.amin(-1)
    return _stats_from(amax, amin)


def _stats_from(amax: torch.Tensor, amin: torch.Tensor):
    log_amax = torch.log2(amax)
    log_amin = torch.maximum(torch.log2(amin), log_amax - MIN_CLIP)
    encoded = (log_amax < 0) & (log_amin < log_amax)
    step = torch.where(encoded, (log_amax - log_amin) / NUM_STEPS, torch.ones_like(amax))
    return amax, amin, log_amax, log_amin, encoded, step


def encode_codes(x: torch.Tensor):
    """Codes [N, G, 128] int32 (0..511), signs [N, G, 128] bool, and encoded [N, G] bool for x [N, H] bf16."""
    n, hidden = x.shape
    g = num_groups(hidden)
    _, _, _, log_amin, encoded, step = _group_stats(x)
    v = x[:, :g * GROUP].float().view(n, g, GROUP)
    inv = (1.0 / step).unsqueeze(-1)
    rounding = 2.0 - torch.log2((1.0 + torch.exp2(step)) * 0.5).unsqueeze(-1) * inv
    fused = rounding - log_amin.unsqueeze(-1) * inv
    u = torch.log2(v.abs()) * inv + fused
    codes = torch.floor(torch.clamp(u, min=0.0)).clamp(max=2 ** CODE_BITS - 1).to(torch.int32)
    codes = torch.where(encoded.unsqueeze(-1), codes, torch.zeros_like(codes))
    return codes, torch.signbit(v), encoded


def decode_codes(codes: torch.Tensor, signs: torch.Tensor, log_amin: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """fp32 values of codes [N, G, 128] for the groups' log_amin and step [N, G]."""
    mag = torch.exp2((codes - 1).float() * step.unsqueeze(-1) + log_amin.unsqueeze(-1))
    mag = torch.where(codes == 0, torch.zeros_like(mag), mag)
    return torch.where(signs, -mag, mag)


def roundtrip(x: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) in fp32: what the receiver adds up for a row x [N, H] bf16."""
    n, hidden = x.shape
    g = num_groups(hidden)
    out = x.float().clone()
    codes, signs, encoded = encode_codes(x)
    _, _, _, log_amin, _, step = _group_stats(x)
    dec = decode_codes(codes, signs, log_amin, step)
    head = out[:, :g * GROUP].view(n, g, GROUP)
    head.copy_(torch.where(encoded.unsqueeze(-1), dec, head))
    return out


def error_bound(x: torch.Tensor) -> torch.Tensor:
    """Per value of x [N, H] bf16: the largest |roundtrip(x) - x| the format allows (0 where sent as bf16)."""
    n, hidden = x.shape
    g = num_groups(hidden)
    amax, _, _, _, encoded, step = _group_stats(x)
    bound = torch.zeros(n, hidden, dtype=torch.float32, device=x.device)
    head = (eps(step).unsqueeze(-1) + APPROX_REL) * x[:, :g * GROUP].float().abs().view(n, g, GROUP) \
        + (amax * 2.0 ** -MIN_CLIP).unsqueeze(-1)
    bound[:, :g * GROUP] = torch.where(encoded.unsqueeze(-1), head, torch.zeros_like(head)).view(n, g * GROUP)
    return bound


# -- the packed bytes (the kernels' wire format) --------------------------------------------------------
def _bf16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The wire bytes of rows x [N, H] bf16: (uint8 [N, message_bytes(H)], bytes each row needs [N] int64)."""
    n, hidden = x.shape
    g = num_groups(hidden)
    mb = meta_bytes(hidden)
    out = torch.zeros(n, message_bytes(hidden), dtype=torch.uint8)
    amax, amin, *_ = _group_stats(x)
    meta = (_bf16_bits(amax) | (_bf16_bits(amin) << 16)).to(torch.int64)
    meta_u8 = torch.stack([(meta >> (8 * b)) & 0xFF for b in range(4)], -1).to(torch.uint8).view(n, 4 * g)
    out[:, :4 * g] = meta_u8
    raw = x.contiguous().view(torch.uint8).view(n, 2 * hidden)
    out[:, mb:] = raw                                   # bf16 layout everywhere, encoded groups overwritten
    codes, signs, encoded = encode_codes(x)
    units = codes.view(n, g, GROUP // UNIT, UNIT).to(torch.int64)
    sgn = signs.view(n, g, GROUP // UNIT, UNIT).to(torch.int64)
    # 80-bit words as 10 bytes: byte b holds bits 8b..8b+7 of sum(code_k << 9k) + sum(sign_k << 72+k)
    lo = torch.zeros(n, g, GROUP // UNIT, dtype=torch.int64)   # bits 0..63
    hi = torch.zeros_like(lo)                                   # bits 64..79
    for k in range(UNIT):
        bit = CODE_BITS * k
        if bit + CODE_BITS <= 64:
            lo |= units[..., k] << bit
        else:   # code 7 straddles bit 64 (bits 63..71)
            lo |= (units[..., k] & ((1 << (64 - bit)) - 1)) << bit
            hi |= units[..., k] >> (64 - bit)
        hi |= sgn[..., k] << (72 - 64 + k)
    words = [((lo >> (8 * b)) & 0xFF) for b in range(8)] + [(hi >> (8 * b)) & 0xFF for b in range(2)]
    packed = torch.stack(words, -1).to(torch.uint8).view(n, g, ENCODED_GROUP_BYTES)
    groups = out[:, mb:mb + g * 2 * GROUP].view(n, g, 2 * GROUP)
    groups[..., :ENCODED_GROUP_BYTES] = torch.where(encoded.unsqueeze(-1), packed, groups[..., :ENCODED_GROUP_BYTES])
    used = mb + 2 * hidden - (encoded.sum(-1) * (2 * GROUP - ENCODED_GROUP_BYTES)).to(torch.int64)
    return out, used


def unpack(data: torch.Tensor, hidden: int) -> torch.Tensor:
    """fp32 rows [N, H] from wire bytes [N, message_bytes(H)] uint8 (what combine's receiver decodes)."""
    n = data.shape[0]
    g = num_groups(hidden)
    mb = meta_bytes(hidden)
    meta = data[:, :4 * g].view(n, g, 4).to(torch.int64)
    meta = meta[..., 0] | (meta[..., 1] << 8) | (meta[..., 2] << 16) | (meta[..., 3] << 24)

    def from_bits(bits):
        return (bits.to(torch.int32) << 16).view(torch.float32)

    _, _, _, log_amin, encoded, step = _stats_from(from_bits(meta & 0xFFFF), from_bits(meta >> 16))
    out = data[:, mb:mb + 2 * hidden].contiguous().view(torch.bfloat16).float().clone()
    b = data[:, mb:mb + g * 2 * GROUP].contiguous().view(n, g, 2 * GROUP)[..., :ENCODED_GROUP_BYTES]
    b = b.reshape(n, g, GROUP // UNIT, UNIT_BYTES).to(torch.int64)
    lo = sum(b[..., i] << (8 * i) for i in range(8))
    hi = b[..., 8] | (b[..., 9] << 8)
    codes, signs = [], []
    for k in range(UNIT):
        bit = CODE_BITS * k
        if bit + CODE_BITS <= 64:
            c = (lo >> bit) & 0x1FF
        else:
            c = ((lo >> bit) & ((1 << (64 - bit)) - 1)) | ((hi << (64 - bit)) & 0x1FF)
        codes.append(c)
        signs.append(((hi >> (8 + k)) & 1).bool())
    codes = torch.stack(codes, -1).view(n, g, GROUP).to(torch.int32)
    signs = torch.stack(signs, -1).view(n, g, GROUP)
    dec = decode_codes(codes, signs, log_amin, step)
    head = out[:, :g * GROUP].view(n, g, GROUP)
    head.copy_(torch.where(encoded.unsqueeze(-1), dec, head))
    return out

