"""Every launcher's argument list against its template's signature, without a GPU.

Each kernel family states its entry points' parameters once (KernelParams in epkern/normal/kernels.py
and epkern/low_latency/kernels.py); the launchers pack their arguments with them. Here the rendered
`extern "C" __global__` signatures are parsed and compared name by name and type by type, and every
launcher runs against a recording module, so a renamed, added or reordered parameter on either side
fails on CPU instead of corrupting a launch on the GPU.
"""
import re
import struct

import numpy as np
import pytest
import torch

from epkern.codegen import KernelParams
from epkern.codegen.launch import _SLOT_FORMATS, launch_values
from epkern.low_latency import kernels as llk
from epkern.normal import kernels as ik

# C parameter type -> KernelParams type
SCALARS = {"int": "i32", "uint32_t": "u32", "unsigned int": "u32", "int64_t": "i64", "uint64_t": "u64", "float": "f32"}

SPECS = [
    (ik.notify_spec(8), ik.PARAMS["notify"]),
    (ik.dispatch_spec(4, 7168, 8, False, 24), ik.PARAMS["dispatch"]),
    (ik.dispatch_spec(2, 2048, 0, True, 20), ik.PARAMS["dispatch"]),
    (ik.combine_spec(8, 7168, 8, 24), ik.PARAMS["combine"]),
    *[(llk.LowLatencySpec(kind, 7168, 8, 256, 8), llk.PARAMS["dispatch"]) for kind in llk.DISPATCH_KINDS],
    (llk.LowLatencySpec("combine", 7168, 8, 256, 8), llk.PARAMS["combine"]),
    (llk.BarrierSpec(8), llk.PARAMS["barrier"]),
]


def kernel_signatures(source: str) -> dict[str, list[tuple[str, str]]]:
    """kernel name -> [(parameter name, KernelParams type)] of every extern "C" __global__ function."""
    source = re.sub(r"//[^\n]*", "", source)
    out = {}
    pattern = r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)'
    for name, params in re.findall(pattern, source):
        parsed = []
        for param in params.split(","):
            param = " ".join(param.replace("__restrict__", "").split())
            ctype, pname = re.fullmatch(r"(.*?)\s*(\w+)", param).groups()
            if "*" in ctype:
                kind = "ptr"
            else:
                kind = SCALARS[ctype.replace("const ", "")]
            parsed.append((pname, kind))
        out[name] = parsed
    return out


@pytest.mark.parametrize("spec,params", SPECS, ids=lambda x: getattr(x, "symbol", ""))
def test_template_signatures_match_the_declared_parameters(spec, params):
    kernels = kernel_signatures(spec.render())
    assert set(kernels) == {f"{spec.symbol}_{p.entry}" for p in params}
    for p in params:
        template = kernels[f"{spec.symbol}_{p.entry}"]
        declared = [(n, "ptr" if t == "addr" else t) for n, t in zip(p.names, p.types)]
        assert [n for n, _ in template] == list(p.names), f"{p.entry}: parameter names or order differ"
        assert template == declared, f"{p.entry}: parameter types differ"


def test_the_parser_sees_every_parameter():
    src = ('extern "C" __global__ void __launch_bounds__(64)\nk_x(const int4* __restrict__ a,  // [T] in\n'
           '    int n, uint64_t t, unsigned int* c)\n{}')
    assert kernel_signatures(src) == {"k_x": [("a", "ptr"), ("n", "i32"), ("t", "u64"), ("c", "ptr")]}


def test_pack_orders_casts_and_names_mistakes():
    p = KernelParams("k", "x n:i32 seq:u32 off:i64 addr:addr")
    x = torch.zeros(2)
    args = p.pack(off=5, addr=1 << 40, seq=7, n=3, x=x)
    assert args[0] is x and [type(a) for a in args[1:]] == [np.int32, np.uint32, np.int64, np.uint64]
    assert args[1:] == [3, 7, 5, 1 << 40]
    with pytest.raises(TypeError, match=r"missing arguments \['seq'\].*unknown arguments \['sq'\]"):
        p.pack(x=x, n=3, sq=7, off=5, addr=0)
    with pytest.raises(TypeError, match=r"missing arguments \['addr'\]"):
        p.pack(x=x, n=3, seq=7, off=5)
    with pytest.raises(ValueError, match="unknown types"):
        KernelParams("k", "x:int")


def test_bind_places_static_values_once_and_dynamic_ones_per_call():
    p = KernelParams("k", "x n:i32 y seq:u32 off:i64")
    x = torch.zeros(2)
    bound = p.bind("y x", n=3, seq=7, off=-5)
    assert bound(10, 20) == (20, 3, 10, 7, -5)
    assert bound(11, 21) == (21, 3, 11, 7, -5)   # nothing of the previous call stays
    assert all(type(v) is int for v in bound(1, 2))  # scalars as plain ints: the Launcher packs them
    with pytest.raises(TypeError, match="2 per-call values expected, got 1"):
        bound(1)
    static = p.bind("y", x=x, n=1, seq=2, off=3)
    assert static(0)[0] == x.data_ptr()
    with pytest.raises(TypeError, match=r"missing arguments \['seq'\]"):
        p.bind("y x", n=3, off=5)


# -- every launcher against a recording module ----------------------------------------------------
class _Recorder:
    def __init__(self):
        self.calls = []

    def launch(self, entry, grid, block, *args, smem=0, stream=None):
        self.calls.append((entry, args))

    def launch_values(self, entry, grid, block, codes, values, smem=0, stream=None):
        self.calls.append((entry, (codes, values)))


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(ik, "get_module", lambda spec, device=None: rec)
    monkeypatch.setattr(llk, "get_module", lambda spec, device=None: rec)
    return rec


def _check(rec, params_by_entry):
    assert rec.calls
    for entry, args in rec.calls:
        p = params_by_entry[entry]
        if isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str):  # launch_values(codes, values)
            codes, values = args
            assert codes == p.codes and len(values) == len(p.names)
            # every value fits its slot as the Launcher packs it (pointers as ints, scalars of their C type)
            struct.pack("<" + "".join(_SLOT_FORMATS[c] for c in codes), *values)
        else:
            assert len(args) == len(p.names)
            launch_values(args)   # no untyped Python scalar reaches the launch


def test_normal_launchers_pass_every_parameter(recorder):
    t = torch.zeros(4, 2, dtype=torch.int32)
    layout = ik.PeerLayout(64 << 20)
    ik.launch_notify(None, 2, t, t, t, 1, 0, t, 1, t, 10, t, t, t, 1 << 30, 1 << 31)
    spec = ik.dispatch_spec(2, 4096, 8, False, 20)
    ik.launch_dispatch(None, spec, t, None, t, t, t, t, 16, 4, 0, t, t, layout, 100, 10, t, None, t, t, t, 1 << 31)
    ik.launch_dispatch(None, spec, t, None, t, t, t, t, 16, 4, 0, t, t, layout, 100, 10, t, None, t, t, t, 1 << 31,
                       2, 5, 300)
    spec = ik.combine_spec(2, 4096, 8, 20)
    ik.launch_combine(None, spec, t, t, t, t, t, 0, t, t, layout, 100, 10, None, None, t, t, 1 << 31)
    ik.launch_combine(None, spec, t, t, t, t, t, 0, t, t, layout, 100, 10, None, None, t, t, 1 << 31, 1, 3, 77)
    _check(recorder, {p.entry: p for ps in ik.PARAMS.values() for p in ps})


class _LauncherRecorder:
    """get_module's stand-in for the prepared launches: launcher() returns a recording callable."""

    def __init__(self):
        self.calls = []

    def launcher(self, entry, grid, block, codes, smem=0, cooperative=False):
        def launch(stream, *values):
            self.calls.append((entry, codes, values))
        launch.device = 0
        return launch


class _State:
    rank, local_base, timeout_ns = 1, 1 << 40, np.uint64(10)

    def __init__(self):
        self.ptr_table = torch.zeros(2, dtype=torch.int64)
        self.mask = torch.zeros(2, dtype=torch.int32)
        self.epochs = torch.zeros(4, dtype=torch.int32)
        self.tickets = torch.zeros(4, dtype=torch.int32)


def _recorded(rec, family: str, with_hook: bool) -> list[dict]:
    """The recorded launches of a low-latency family as {parameter: value}, each checked against its list."""
    by_entry = {p.entry: p for p in llk.PARAMS[family]}
    assert [e for e, _, _ in rec.calls] == (["send", "recv"] if with_hook else ["send_recv"])
    out = []
    for entry, codes, values in rec.calls:
        p = by_entry[entry]
        assert codes == p.codes and len(values) == len(p.names)
        out.append(dict(zip(p.names, values)))
    return out


@pytest.mark.parametrize("with_hook", [False, True])
@pytest.mark.parametrize("idx", [0, 1])
def test_low_latency_launches_pass_every_parameter(monkeypatch, with_hook, idx):
    rec = _LauncherRecorder()
    monkeypatch.setattr(llk, "get_module", lambda spec, device=None: rec)
    monkeypatch.setattr(llk, "current_stream_handle", lambda device: 0)
    state, layout = _State(), llk.BufferLayout(8, 7168, 2, 16)
    spec = llk.LowLatencySpec("fp8", 7168, 2, 16, 2)
    launch = llk.DispatchLaunch(spec, layout, 8, 5, with_hook, 0, state, err=0x1000, err_any=0x2000)
    inputs, outputs = (11, 12, 0), tuple(range(21, 31))
    hook = launch(0, idx, inputs, outputs)
    if with_hook:
        hook()
    for got in _recorded(rec, "dispatch", with_hook):
        assert got["epoch_counter"] == state.epochs.data_ptr() + 8 * idx
        assert got["flags_off"] == layout.flags(idx) and got["max_tokens"] == 8 and got["rank"] == 1
        if "x" in got:
            assert (got["x"], got["topk_idx"], got["topk_weights"], got["num_tokens"]) == (11, 12, 0, 5)
            assert (got["send_ticket"], got["err"], got["err_any"]) == (state.tickets.data_ptr() + 8 * idx, 0x1000,
                                                                      0x2000)
        if "recv_x" in got:
            assert (got["recv_x"], got["wait_stats"], got["timeout_ns"]) == (21, 30, 10)
    rec.calls.clear()
    spec = llk.LowLatencySpec("combine", 7168, 2, 16, 2)
    hook = llk.CombineLaunch(spec, layout, 8, 5, with_hook, 0, state)(0, idx, (41, 42, 43, 44, 0), (51, 52, 0))
    if with_hook:
        hook()
    for got in _recorded(rec, "combine", with_hook):
        assert got["epoch_counter"] == state.epochs.data_ptr() + 4 * (2 * idx + 1)
        assert got["recv_off"] == layout.combine_recv(idx) and got["num_tokens"] == 5
        if "x" in got:
            assert (got["x"], got["carried_weights"], got["weights_off"]) == (41, 0, layout.weights(idx))
        if "out" in got:
            assert (got["out"], got["topk_idx"]) == (51, 52)


def test_low_latency_barrier_passes_every_parameter(recorder):
    t = torch.zeros(4, 2, dtype=torch.int32)
    llk.launch_barrier(2, ptr_table=t, rank=1, epoch=t, mask=t, timeout_ns=np.uint64(10))
    _check(recorder, {"barrier": llk.BARRIER_PARAMS})
