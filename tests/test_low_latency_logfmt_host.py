"""The kernels' LogFMT helpers (templates/include/low_latency_logfmt.cuh.j2) against the CPU reference,
compiled for the host: the include is rendered, its two PTX approximations swapped for log2f / exp2f,
and a small driver encodes rows the way combine's send does (per 128-channel group: amax/amin of
the 16 units, meta, grid, encode, stage) and decodes them the way combine's receive does. The wire
bytes must be the reference's (epkern.low_latency.logfmt.pack), and each side must decode the
other's. Skipped without a host C++ compiler."""
import re
import shutil
import subprocess

import pytest
import torch

from epkern.codegen.render import environment
from epkern.low_latency import logfmt as L

CXX = shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler")

SHIMS = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <vector>
#define EPK_DEVICE static inline
struct int4 { int x, y, z, w; };
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
static inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
template <class T> static inline T __ldcg(const T* p) { return *p; }
static inline int4 epk_ld_peer(const int4* p) { return *p; }
"""

DRIVER = r"""
// rows of HIDDEN bf16 on stdin (n first); writes n rows of SLOT bytes (encoded as combine's send
// does), then decodes the n rows read back after them (as combine's receive does) to fp32
int main() {
    constexpr int ROW_INT4 = HIDDEN / 8;
    int n;
    if (std::fread(&n, 4, 1, stdin) != 1) return 1;
    std::vector<int4> x(static_cast<size_t>(n) * ROW_INT4);
    if (std::fread(x.data(), 16, x.size(), stdin) != x.size()) return 2;
    std::vector<uint8_t> out(static_cast<size_t>(n) * SLOT, 0);
    for (int t = 0; t < n; ++t) {
        uint8_t* dst = out.data() + static_cast<size_t>(t) * SLOT;
        for (int first = 0; first < ROW_INT4; first += 16) {   // one half-warp = one group
            const int g = first / 16;
            float amax = 0.0f, amin = __int_as_float(0x7f800000);
            for (int j = 0; j < 16 && first + j < ROW_INT4; ++j) epk_logfmt_minmax8(x[t * ROW_INT4 + first + j], amax, amin);
            const bool full = g < LOGFMT_GROUPS;
            const uint32_t meta = epk_logfmt_meta(amax, amin);
            const EpkLogfmtGrid grid = epk_logfmt_grid(meta);
            if (full) std::memcpy(dst + 4 * g, &meta, 4);
            if (full && grid.encoded) {
                alignas(16) uint8_t stage[LOGFMT_GROUP_BYTES];
                for (int j = 0; j < 16; ++j) {
                    uint64_t lo; uint32_t hi;
                    epk_logfmt_encode8(x[t * ROW_INT4 + first + j], grid, lo, hi);
                    epk_logfmt_stage_unit(stage, j, lo, hi);
                }
                std::memcpy(dst + LOGFMT_META_BYTES + 256 * g, stage, LOGFMT_GROUP_BYTES);
            } else {
                for (int j = 0; j < 16 && first + j < ROW_INT4; ++j)
                    std::memcpy(dst + LOGFMT_META_BYTES + 16 * (first + j), &x[t * ROW_INT4 + first + j], 16);
            }
        }
    }
    std::fwrite(out.data(), 1, out.size(), stdout);
    std::vector<uint8_t> back(static_cast<size_t>(n) * SLOT);
    if (std::fread(back.data(), 1, back.size(), stdin) != back.size()) return 3;
    std::vector<float> dec(static_cast<size_t>(n) * HIDDEN);
    for (int t = 0; t < n; ++t)
        for (int i = 0; i < ROW_INT4; ++i) {
            float v[8];
            epk_logfmt_load8(back.data() + static_cast<size_t>(t) * SLOT, i, v);
            std::memcpy(&dec[static_cast<size_t>(t) * HIDDEN + 8 * i], v, 32);
        }
    std::fwrite(dec.data(), 4, dec.size(), stdout);
    return 0;
}
"""


def _host_source(hidden: int) -> str:
    env = environment()
    bf16 = env.get_template("include/bf16.cuh.j2").render()
    include = env.get_template("include/low_latency_logfmt.cuh.j2").render(logfmt_meta_bytes=L.meta_bytes(hidden))
    include = re.sub(r'asm\("lg2\.approx\.f32 %0, %1;" : "=f"\(y\) : "f"\(x\)\);', "y = std::log2(x);", include)
    include = re.sub(r'asm\("ex2\.approx\.f32 %0, %1;" : "=f"\(y\) : "f"\(x\)\);', "y = std::exp2(x);", include)
    assert "asm(" not in include, "a PTX statement the host build does not know"
    return (SHIMS + bf16 + f"\nconstexpr int HIDDEN = {hidden};\nconstexpr int SLOT = {L.message_bytes(hidden)};\n"
            + include + DRIVER)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    binaries = {}

    def build(hidden: int):
        if hidden not in binaries:
            d = tmp_path_factory.mktemp(f"logfmt{hidden}")
            (d / "logfmt.cpp").write_text(_host_source(hidden))
            subprocess.run([CXX, "-O2", "-std=c++17", "-o", str(d / "logfmt"), str(d / "logfmt.cpp")], check=True)
            binaries[hidden] = d / "logfmt"
        return binaries[hidden]
    return build


def _run(binary, x: torch.Tensor, back: torch.Tensor):
    n, hidden = x.shape
    payload = torch.tensor([n], dtype=torch.int32).numpy().tobytes() + x.contiguous().view(torch.int16).numpy().tobytes()
    payload += back.contiguous().numpy().tobytes()
    res = subprocess.run([str(binary)], input=payload, capture_output=True, check=True)
    slot = L.message_bytes(hidden)
    wire = torch.frombuffer(bytearray(res.stdout[:n * slot]), dtype=torch.uint8).view(n, slot)
    dec = torch.frombuffer(bytearray(res.stdout[n * slot:]), dtype=torch.float32).view(n, hidden)
    return wire, dec


def _rows(hidden, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, hidden, generator=g) * 0.02
    x[1] *= 1e3                                      # amax >= 1: bf16
    x[2, :128] = 0                                   # zero group
    x[3, 5] = 1e-35                                  # clipped range
    x[4, :128] = -0.125                              # amax == amin: bf16
    x[5, 7] = float("nan")                           # a NaN keeps its group bf16
    x[6] = torch.exp2(torch.linspace(-40, -1, hidden)) * torch.sign(torch.randn(hidden, generator=g))
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("hidden", [128, 1000, 2880, 7168])
def test_kernel_helpers_write_the_reference_bytes(driver, hidden):
    x = _rows(hidden, hidden)
    ref, used = L.pack(x)
    wire, dec = _run(driver(hidden), x, ref)
    mb = L.meta_bytes(hidden)
    assert torch.equal(wire[:, :mb], ref[:, :mb]), "group statistics differ"
    # every byte the row sends (bf16 groups exactly; an encoded code may differ by the last-bit
    # rounding of log2 between libm and torch, on a handful of values at a threshold)
    _, _, encoded = L.encode_codes(x)
    g = L.num_groups(hidden)
    sent = torch.ones(16, 2 * hidden, dtype=torch.bool)              # the bytes a row puts on the wire
    sent[:, :g * 256].view(16, g, 256)[..., L.ENCODED_GROUP_BYTES:] &= ~encoded.unsqueeze(-1)
    body, ref_body = wire[:, mb:], ref[:, mb:]
    differ = (body != ref_body)[sent].sum().item()
    assert differ <= max(4, int(sent.sum()) // 20000), f"{differ} of {int(sent.sum())} wire bytes differ"
    # the receive helper decodes the reference's bytes as the reference does
    want = L.unpack(ref, hidden)
    both_nan = torch.isnan(dec) & torch.isnan(want)
    close = (dec - want).abs() <= L.APPROX_REL * want.abs()
    assert (close | both_nan).all(), f"decode differs: worst {((dec - want).abs() / want.abs()).nanmean()}"
    # and within the bound of the original values
    bound = L.error_bound(x)
    ok = ((dec - x.float()).abs() <= bound) | torch.isnan(x.float())
    assert ok.all()
    assert int(encoded[:, :g].sum()) > 0


def test_kernel_helpers_decode_their_own_bytes(driver):
    x = _rows(2880, 1)
    ref, _ = L.pack(x)
    wire, _ = _run(driver(2880), x, ref)
    _, dec = _run(driver(2880), x, wire.contiguous())
    ok = ((dec - x.float()).abs() <= L.error_bound(x)) | torch.isnan(x.float())
    assert ok.all()
