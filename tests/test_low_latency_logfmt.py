"""LogFMT-10 (combine's use_logfmt=True wire format) on the CPU reference, and the low-latency handle."""
import pickle

import pytest
import torch

from epkern.low_latency import logfmt as L
from epkern.low_latency.handle import LowLatencyHandle, as_handle


def _rows(seed=0, n=8, hidden=2880):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g) * 0.05
    x[1, :128] = 0                      # a zero group: sent as bf16 zeros
    if hidden >= 1024:
        x[2, 128:256] *= 400            # amax >= 1: sent as bf16
        x[3, 256] = 1e-30               # a value far below amax: clipped range, becomes 0
        x[4, 384:512] = 0.25            # amax == amin: sent as bf16
        x[5, 512:640] = 0               # zeros inside an encoded group stay zeros
        x[5, 520] = -0.5
    return x.to(torch.bfloat16)


def test_max_eps_is_the_documented_figure():
    assert abs(L.MAX_EPS - 0.02175) < 5e-5
    assert L.eps(32 / 510) == pytest.approx(L.MAX_EPS)
    assert L.eps(8 / 510) == pytest.approx(0.0054, abs=1e-4)


@pytest.mark.parametrize("hidden", [128, 2880, 7168])
def test_roundtrip_within_the_bound(hidden):
    x = _rows(1, hidden=hidden)
    got, bound = L.roundtrip(x), L.error_bound(x)
    err = (got - x.float()).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max()}"
    # where the bound is 0 (groups left bf16, the tail, zeros) the value is exact
    assert torch.equal(got[bound == 0], x.float()[bound == 0])
    assert (got[x.float() == 0] == 0).all()
    assert (torch.signbit(got) == torch.signbit(x.float()))[x.float() != 0].all()


def test_which_groups_are_encoded():
    x = _rows(2)
    _, _, encoded = L.encode_codes(x)
    assert encoded.shape == (8, 2880 // 128)
    assert not encoded[1, 0] and not encoded[2, 1] and not encoded[4, 3]
    assert encoded[3, 2] and encoded[5, 4] and encoded[0].all() and encoded[6:].all()
    got = L.roundtrip(x)
    for r, g in ((1, 0), (2, 1), (4, 3)):
        assert torch.equal(got[r, 128 * g:128 * g + 128], x[r, 128 * g:128 * g + 128].float())
    assert torch.equal(got[:, 2816:], x[:, 2816:].float()), "the 64 tail channels travel as bf16"
    assert got[3, 256] == 0, "a value below the clipped amin (2^-32 amax) decodes to 0"


def test_nearest_level_in_the_linear_domain():
    x = _rows(3, n=8, hidden=1024)[2:6]
    codes, signs, encoded = L.encode_codes(x)
    _, _, _, log_amin, _, step = L._group_stats(x)
    levels = torch.exp2(torch.arange(511).float().view(1, 1, -1) * step.unsqueeze(-1) + log_amin.unsqueeze(-1))
    levels = torch.cat([torch.zeros_like(levels[..., :1]), levels], -1)      # [N, G, 512]: code -> magnitude
    a = x.float().abs().view(4, 8, 128)
    best = (a.unsqueeze(-1) - levels.unsqueeze(2)).abs().argmin(-1)           # brute force over every code
    chosen_err = (levels.gather(-1, codes.long()) - a).abs()
    best_err = (levels.gather(-1, best) - a).abs()
    enc = encoded.unsqueeze(-1).expand_as(a)
    assert (chosen_err[enc] <= best_err[enc] * (1 + 1e-5) + 1e-30).all()
    # the group's amax is code 511 and its amin code 1
    assert (codes.amax(-1)[encoded] == 511).all()


def test_the_bound_is_tight():
    # a group spanning [2^-9, 2^-1]: the worst error must come close to eps(8 / 510) * |x|
    v = torch.exp2(torch.linspace(-9, -1, 128))
    x = v.view(1, -1).to(torch.bfloat16)
    x = torch.cat([x, (v * torch.exp2(torch.rand(128) * 0.01)).view(1, -1).to(torch.bfloat16)])
    rel = ((L.roundtrip(x) - x.float()).abs() / x.float().abs()).max()
    step = (-1 - -9) / 510
    assert rel <= L.eps(step) * 1.001 and rel > 0.3 * L.eps(step)


@pytest.mark.parametrize("hidden", [128, 2880, 7168])
def test_pack_unpack_is_the_roundtrip(hidden):
    x = _rows(4, hidden=hidden)
    data, used = L.pack(x)
    assert data.shape == (8, L.message_bytes(hidden)) and data.dtype == torch.uint8
    assert torch.equal(L.unpack(data, hidden), L.roundtrip(x))
    _, _, encoded = L.encode_codes(x)
    assert torch.equal(used, L.meta_bytes(hidden) + 2 * hidden - 96 * encoded.sum(-1))
    # meta: amax and amin as bf16 bits of each group
    meta = data[0, :4].to(torch.int64)
    amax = x[0, :128].float().abs().max().to(torch.bfloat16).view(torch.int16).item() & 0xFFFF
    assert int(meta[0]) | int(meta[1]) << 8 == amax


def test_packing_of_one_unit():
    # unit 0 of group 0: codes at bits 9k, signs at bits 72 + k of an 80-bit little-endian word
    x = torch.full((1, 128), 0.01).to(torch.bfloat16)
    x[0, 1] = -0.5
    x[0, 127] = 1e-3
    data, _ = L.pack(x)
    codes, signs, encoded = L.encode_codes(x)
    assert encoded[0, 0]
    mb = L.meta_bytes(128)
    word = sum(int(b) << (8 * i) for i, b in enumerate(data[0, mb:mb + 10].tolist()))
    for k in range(8):
        assert (word >> (9 * k)) & 0x1FF == int(codes[0, 0, k])
        assert (word >> (72 + k)) & 1 == int(signs[0, 0, k])


# -- the handle --------------------------------------------------------------------------------------
def _handle(weights=None):
    return LowLatencyHandle(torch.zeros(4, 32, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int64), 16, 256, 8,
                            token_rows=torch.zeros(2, 16, 2, dtype=torch.int32),
                            recv_tokens=torch.zeros(2, dtype=torch.int32), token_weights=weights)


def test_handle_unpacks_into_deepeps_five_fields():
    h = _handle()
    src_info, layout_range, m, hidden, num_experts = h
    assert isinstance(h, tuple) and len(h) == 5 and (m, hidden, num_experts) == (16, 256, 8)
    assert h[0] is src_info and h[-1] == 8
    assert h.token_rows.shape == (2, 16, 2) and h.recv_tokens.shape == (2,) and not h.carries_weights
    assert _handle(torch.zeros(2, 16, 2)).carries_weights
    with pytest.raises(AttributeError):
        h.token_rows = None
    again = pickle.loads(pickle.dumps(h))
    assert isinstance(again, LowLatencyHandle) and torch.equal(again.token_rows, h.token_rows)
    assert "M=16" in repr(h)


def test_foreign_tuples_are_rejected_by_name():
    h = _handle()
    assert as_handle(h) is h
    with pytest.raises(TypeError, match="plain 5-tuple"):
        as_handle(tuple(h))
    with pytest.raises(TypeError, match="plain 7-tuple"):
        as_handle(tuple(h) + (h.token_rows, h.recv_tokens))
    with pytest.raises(TypeError, match="LowLatencyHandle"):
        as_handle([1, 2, 3])
