"""NVRTC: every template compiles to an sm_90a cubin on a machine without a GPU; errors carry context."""
import dataclasses
import struct

import pytest

from epkern.codegen import CompileError, KernelSpec, build, check_int, compiler
from epkern.codegen import render as render_mod
from epkern.deployment import Deployment, specs_for
from epkern.layout import LayoutSpec

ARCH = "sm_90a"
EM_CUDA = 190

# Deployments spanning hidden sizes, expert counts, top-k and EP sizes (odd ones included):
# every registered kernel family contributes its specs for each.
DEPLOYMENTS = [
    Deployment(hidden=7168, num_experts=256, num_topk=8, ep_sizes=(2, 4, 8, 16, 32, 64)),  # DeepSeek-V3
    Deployment(hidden=2880, num_experts=128, num_topk=4, ep_sizes=(1, 2, 8)),               # gpt-oss
    Deployment(hidden=2048, num_experts=60, num_topk=6, ep_sizes=(3, 5, 12)),
    Deployment(hidden=5120, num_experts=160, num_topk=16, ep_sizes=(10, 40)),
]
DEPLOYMENT_SPECS = specs_for(DEPLOYMENTS)

# The layout family on its own: rank counts off the 8-rank packed-store path and at the 64-rank limit.
LAYOUT_SPECS = [
    LayoutSpec(num_experts=e, num_ranks=r, num_topk=k, threads=t)
    for e, r, k, t in [(9, 3, 1, 256), (14, 7, 2, 256), (72, 24, 3, 128), (448, 56, 9, 512),
                       (64, 64, 8, 256), (126, 63, 5, 64)]
]


def _elf_machine(cubin: bytes) -> int:
    return struct.unpack_from("<H", cubin, 18)[0]


@pytest.mark.parametrize("spec", DEPLOYMENT_SPECS + LAYOUT_SPECS, ids=lambda s: s.name)
def test_spec_compiles_to_a_cubin(spec):
    entry = build(spec, ARCH)
    assert entry.cubin[:4] == b"\x7fELF"
    assert _elf_machine(entry.cubin) == EM_CUDA
    assert spec.symbol.encode() in entry.cubin  # the entry point kept its readable name
    assert entry.meta["arch"] == ARCH and entry.meta["name"] == spec.name


def test_every_template_is_covered_by_the_matrix():
    reached = {s.template for s in DEPLOYMENT_SPECS + LAYOUT_SPECS}
    missing = sorted(set(render_mod.list_templates()) - reached)
    assert not missing, (f"templates {missing} are reached by no spec in the compile matrix: register their family "
                         "in epkern.deployment.FAMILY_MODULES (deployment_specs) so they are built and tested")


# -- compile errors -------------------------------------------------------------------------------
BROKEN_SOURCE = """\
extern "C" __global__ void broken_v1(int* out)
{
    out[0] = 1;
    out[1] = undefined_symbol + 2;
    out[2] = 3;
}
"""


@dataclasses.dataclass(frozen=True)
class BrokenSpec(KernelSpec):
    """Test-only family whose source does not compile."""

    family = "broken"
    template = "none"
    variant: int = 1

    def validate(self):
        check_int("BrokenSpec", "variant", self.variant, 0, 9)

    def template_vars(self):
        return {}

    def name_fields(self):
        return f"v{self.variant}"

    def render(self):
        return BROKEN_SOURCE


def test_compile_error_carries_spec_options_log_and_lines(isolated_cache):
    spec = BrokenSpec()
    with pytest.raises(CompileError) as info:
        build(spec, ARCH)
    err = info.value
    assert err.spec is spec
    assert "-arch=sm_90a" in err.options and "-std=c++17" in err.options
    assert any(o.startswith("-I") for o in err.options)  # the options NVRTC really saw
    assert "undefined_symbol" in err.log and "error" in err.log
    numbers = [n for n, _ in err.source_lines]
    assert 4 in numbers
    assert dict(err.source_lines)[4].strip() == "out[1] = undefined_symbol + 2;"
    assert set(numbers) <= {3, 4, 5}  # the offending line with one line of context
    message = str(err)
    for part in (spec.name, str(spec), "-arch=sm_90a", "undefined_symbol", "source lines:"):
        assert part in message
    assert not list(isolated_cache.rglob("*.cubin"))  # nothing was cached


def test_offending_lines_parses_nvrtc_log():
    source = "a\nb\nc\nd\ne\n"
    log = 'k.cu(2): error: identifier "x" is undefined\nk.cu(5): warning: unused\n'
    assert compiler._offending_lines(log, source) == [(1, "a"), (2, "b"), (3, "c")]
    assert compiler._offending_lines("", source) == []


# -- architecture selection -----------------------------------------------------------------------
def test_target_arch_override_and_validation(monkeypatch):
    monkeypatch.setenv("EPKERN_ARCH", "sm_100a")
    assert compiler.target_arch() == "sm_100a"
    assert compiler.target_arch("sm_90") == "sm_90"  # an explicit argument wins
    monkeypatch.setenv("EPKERN_ARCH", "hopper")
    with pytest.raises(ValueError, match=r"'hopper'.*sm_90a"):
        compiler.target_arch()
    with pytest.raises(ValueError, match="sm_90a"):
        compiler.target_arch("90a")


def test_default_arch_without_gpu(monkeypatch):
    monkeypatch.delenv("EPKERN_ARCH", raising=False)
    monkeypatch.setattr(compiler, "detected_arch", lambda: None)
    assert compiler.target_arch() == "sm_90a"


def test_compile_options_hold_no_machine_paths():
    options = compiler.compile_options(ARCH)
    assert "-arch=sm_90a" in options
    assert not [o for o in options if o.startswith("-I")]


def test_cutlass_headers_are_on_the_include_path():
    """nvidia-cutlass is a dependency for templates that use CUTLASS/CuTe (no template does yet)."""
    pytest.importorskip("cutlass_library")
    import os

    found = [d for d in compiler.include_dirs() if os.path.isfile(os.path.join(d, "cutlass", "cutlass.h"))]
    assert found and os.path.isfile(os.path.join(found[0], "cute", "tensor.hpp"))
