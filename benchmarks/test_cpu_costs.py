"""CPU-side costs of the JIT pipeline, with pytest-benchmark (no GPU needed):

    python3 -m pytest benchmarks/test_cpu_costs.py          # add --benchmark-json=FILE to keep the figures

Spec construction and validation, rendering, the cache key, an NVRTC compile to sm_90a, and a
cache hit from disk (render + key + read + checksum): what a first call and a warm call pay on
the host. Not part of the default test run (pyproject's testpaths is tests/).
"""
import pytest

from epkern.codegen import cache, compiler, jit
from epkern.layout import LayoutSpec

ARCH = "sm_90a"
SPEC = LayoutSpec(num_experts=256, num_ranks=8, num_topk=8)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EPKERN_JIT", raising=False)
    return tmp_path / "cache"


def test_spec_construction(benchmark):
    spec = benchmark(LayoutSpec, num_experts=256, num_ranks=8, num_topk=8)
    assert spec == SPEC


def test_render(benchmark):
    source = benchmark(SPEC.render)
    assert f"{SPEC.symbol}(" in source


def test_cache_key(benchmark):
    source, options = SPEC.render(), compiler.compile_options(ARCH)
    key = benchmark(cache.source_key, source, options, ARCH)
    assert len(key) == 64


def test_compile(benchmark):
    source, options = SPEC.render(), compiler.compile_options(ARCH)
    compiled = benchmark.pedantic(compiler.compile_cubin, args=(SPEC, source, options), rounds=5, iterations=1,
                                  warmup_rounds=1)
    assert compiled.cubin[:4] == b"\x7fELF"


def test_cache_hit_from_disk(benchmark, cache_dir):
    assert jit.build(SPEC, ARCH).fresh
    entry = benchmark(jit.build, SPEC, ARCH)
    assert not entry.fresh and entry.path.is_relative_to(cache_dir)


def test_offline_hit_from_disk(benchmark, cache_dir, monkeypatch):
    jit.build(SPEC, ARCH)
    monkeypatch.setenv("EPKERN_JIT", "0")
    entry = benchmark(jit.build, SPEC, ARCH)
    assert not entry.fresh
