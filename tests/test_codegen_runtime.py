"""The per-call launch path without a GPU: what is cached, what is converted, what still raises."""
import numpy as np
import pytest
import torch

from epkern import fp8, layout
from epkern.codegen import LaunchError, launch, runtime
from epkern.codegen.runtime import LoadedModule


class _FakeCode:
    """Stands in for cuda.core ObjectCode: counts kernel look-ups."""

    def __init__(self):
        self.lookups = []

    def get_kernel(self, name):
        self.lookups.append(name)
        return f"kernel:{name}"


def _module(monkeypatch, calls, fail=None):
    """A module of fake kernels whose launches go to a hook: `calls` gets (launcher, stream handle,
    argument values) per launch; with `fail`, launches reach the driver call instead, which returns
    that error, so the Launcher's own error path raises."""
    module = LoadedModule(fp8._spec(7168, 128, "bf16", "fp32", "row"), "sm_90a", 0, _FakeCode())
    if fail:
        def failing_call(self, stream):  # the driver call of every launch returns `fail`
            self._driver = lambda *args: fail
            return ()

        monkeypatch.setattr(launch.Launcher, "_call_args", failing_call)
        monkeypatch.setattr(launch, "_driver_launch", None)
    else:
        monkeypatch.setattr(launch, "_driver_launch", lambda launcher, stream, values: calls.append(
            (launcher, stream, values)))
    monkeypatch.setattr(runtime, "current_stream_handle", lambda device: 0x1234)
    return module


def test_stream_handle_accepts_ints_and_protocol_objects():
    class Proto:
        def __cuda_stream__(self):
            return (0, 77)

    class TorchLike:
        cuda_stream = 55

    assert launch.stream_handle(12) == 12
    assert launch.stream_handle(Proto()) == 77
    assert launch.stream_handle(TorchLike()) == 55


@pytest.mark.parametrize("bad", [3, 2.5, True, "x"])
def test_launch_values_refuse_untyped_scalars(bad):
    with pytest.raises(TypeError, match="numpy scalar"):
        launch.launch_values((bad,))


def test_module_looks_each_entry_up_once_and_prepares_one_launch(monkeypatch):
    calls = []
    module = _module(monkeypatch, calls)
    t = torch.zeros(2)
    for _ in range(3):
        module.launch("cast", 4, 256, t, np.int32(1))
    assert module.object_code.lookups == [f"{module.spec.symbol}_cast"]
    assert len({id(c[0]) for c in calls}) == 1  # one prepared Launcher serves every call
    launcher, stream, values = calls[0]
    assert stream == 0x1234 and launcher.codes == "pi" and values == (t.data_ptr(), 1)
    assert launcher.name == f"{module.spec.symbol}_cast" and launcher.grid == (4, 1, 1)
    module.launch("cast", 4, 256, t, np.int64(1))  # another argument type: another launch
    assert calls[-1][0].codes == "pq" and calls[-1][0] is not launcher


def test_launch_values_codes():
    t = torch.zeros(4)
    codes, values = launch.launch_values((t, None, np.int32(3), np.int64(4), np.uint32(5), np.uint64(6),
                                          np.float32(0.5), torch.nn.Parameter(t)))
    assert codes == "ppiqIpfp" and values[0] == t.data_ptr() and values[1] == 0 and values[-1] == t.data_ptr()


def test_explicit_stream_is_used(monkeypatch):
    calls = []
    module = _module(monkeypatch, calls)
    module.launch("cast", 1, 32, stream=0x99)
    assert calls[0][1] == 0x99


def test_launch_error_names_the_kernel(monkeypatch):
    module = _module(monkeypatch, [], fail=1)
    with pytest.raises(LaunchError, match=rf"{module.spec.symbol}_cast \(grid=\(7, 1, 1\), block=\(256, 1, 1\), "
                                          rf"smem=0.*INVALID"):
        module.launch("cast", 7, 256, np.int32(1))


@pytest.mark.parametrize("bad", [5, 2.5, True, "x"])
def test_bad_argument_raises_before_launch(monkeypatch, bad):
    calls = []
    module = _module(monkeypatch, calls)
    with pytest.raises(TypeError, match="numpy scalar"):
        module.launch("cast", 1, 32, bad)
    assert calls == []


def test_large_smem_is_allowed_once(monkeypatch):
    allowed = []
    monkeypatch.setattr(runtime, "_set_max_dynamic_smem", lambda kernel, smem, device: allowed.append(smem))
    module = _module(monkeypatch, [])
    for smem in (1024, 64 * 1024, 64 * 1024, 32 * 1024, 100 * 1024):
        module.launch("cast", 1, 32, smem=smem)
    assert allowed == [64 * 1024, 100 * 1024]


def test_specs_are_memoized_per_signature():
    assert fp8._spec(7168, 128, "bf16", "fp32", "col") is fp8._spec(7168, 128, "bf16", "fp32", "col")
    assert fp8._spec(7168, 128, "bf16", "fp32", "col") == fp8.Fp8CastSpec(hidden=7168, scale_layout="col")
    assert layout._spec(256, 8, 8) is layout._spec(256, 8, 8)


def test_memoized_spec_still_validates():
    with pytest.raises(ValueError, match="hidden"):
        fp8._spec(100, 128, "bf16", "fp32", "row")
    with pytest.raises(ValueError, match="num_experts"):
        layout._spec(255, 8, 8)


@pytest.mark.parametrize("cooperative", [False, True])
def test_launcher_calls_the_driver_with_each_streams_handle(cooperative):
    """The driver call's arguments are made once per stream: each call passes its own stream's
    handle, the packed buffer's pointer array and (cuLaunchKernel only) a null `extra`."""
    seen = []
    found = launch.Launcher(None, "k", (3, 2), 64, "pi", smem=128, cooperative=cooperative)
    found._driver = lambda *args: seen.append(args) or 0
    for stream in (0x10, 0x20, 0x10):
        found(stream, 0xABC, np.int32(5))
    assert [args[8].value for args in seen] == [0x10, 0x20, 0x10]
    assert all(args[1:8] == (3, 2, 1, 64, 1, 1, 128) for args in seen)
    assert all(len(args) == (10 if cooperative else 11) for args in seen)
    assert all(args[9] is found._params_arg for args in seen)
    assert found.values() == (0xABC, 5)
